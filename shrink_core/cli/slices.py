"""`slices list | add | remove`: the evaluation slices, and the user's own."""
from __future__ import annotations

from shrink_core.cli.entry import print_json


def add_parser(sub) -> None:
    parser = sub.add_parser("slices", help="list evaluation slices, or add your own")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list slices")
    listing.add_argument("--json", action="store_true")
    adding = actions.add_parser("add", help="add a slice from a file, a folder, or a `datasets` dataset name")
    adding.add_argument("source", help="a .jsonl/.json/.csv/.txt file, a folder of them, or a dataset name")
    adding.add_argument("--id", help="slice id (default: user_<file name>)")
    adding.add_argument("--split", default="train", help="dataset split, for a dataset name")
    removing = actions.add_parser("remove", help="remove a user slice")
    removing.add_argument("id")
    parser.set_defaults(run=run)


def run(args) -> int:
    from shrink_core.evaluation import slices

    if args.action == "list":
        infos = slices.list_slices()
        if args.json:
            print_json([s.row() for s in infos])
        else:
            for s in infos:
                print(f"{s.id:<12} {s.kind:<6} {s.metric:<9} {s.rows_eval:>6} eval rows {s.tokens:>9,} tokens  "
                      f"{', '.join(s.languages) or '-':<20} {s.license}")
        return 0
    if args.action == "add":
        records = slices.load_dataset_records(args.source, split=args.split)
        info = slices.add_user_records(records, args.source, slice_id=args.id)
        print(f"added slice '{info.id}': {info.rows} rows ({info.rows_eval} eval, {info.rows_calib} calib), {info.kind}")
        return 0
    slices.remove_user_slice(args.id)
    print(f"removed slice '{args.id}'")
    return 0
