"""`candidates list | rename | tag | delete | export`: every evaluated candidate, with its lineage."""
from __future__ import annotations

from shrink_core.cli.entry import print_json


def add_parser(sub) -> None:
    parser = sub.add_parser("candidates", help="list, rename, tag, delete or export evaluated candidates")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every candidate with lineage, size, latency and cost")
    listing.add_argument("--target", help="hardware row for projected latency and cost columns")
    listing.add_argument("--json", action="store_true")
    renaming = actions.add_parser("rename", help="rename a candidate")
    renaming.add_argument("id", type=int)
    renaming.add_argument("name")
    tagging = actions.add_parser("tag", help="set a candidate's tags (comma-separated; empty clears them)")
    tagging.add_argument("id", type=int)
    tagging.add_argument("tags")
    deleting = actions.add_parser("delete", help="remove a candidate from every list (its results stay stored)")
    deleting.add_argument("id", type=int)
    deleting.add_argument("--yes", action="store_true", help="confirm the deletion")
    exporting = actions.add_parser("export", help="write the candidate's plan.yaml and provenance.json")
    exporting.add_argument("id", type=int)
    exporting.add_argument("--out", default=".", help="folder to write into (default: here)")
    parser.set_defaults(run=run)


def _fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "missing" if value is None or value != value else f"{value / scale:.{digits}f}"


def run(args) -> int:
    from shrink_core.errors import ShrinkError
    from shrink_core.paths import check_writable
    from shrink_core.results import candidates
    from shrink_core.results.store import Store

    store = Store()
    if args.action == "list":
        table = candidates.candidates_frame(store, target=args.target)
        if args.json:
            print_json(table.astype(object).where(table.notna(), None).to_dict(orient="records"))
            return 0
        if table.empty:
            print("no candidates yet: run `python -m shrink_core eval --plan preset:w8 --slices en` first")
            return 0
        for _, c in table.iterrows():
            parent = f"<- #{int(c['parent_id'])}" if c["parent_id"] == c["parent_id"] and c["parent_id"] is not None else ""
            print(f"#{c['id']:<4} {c['name'][:28]:<28} {c['kind']:<10} {parent:<7} {_fmt(c['memory_bytes'], 1e6)} MB  "
                  f"latency {_fmt(c['latency_ms'], digits=2)} ms/token  protocols {c['budgets'] or '-'}  "
                  f"tags {c['tags'] or '-'}")
            print(f"      plan: {c['plan_summary']}; calibration: {c['calibration']}; code {c['code_version']}")
        return 0
    if args.action == "rename":
        candidates.rename(store, args.id, args.name)
        print(f"renamed #{args.id} to '{args.name.strip()}'")
    elif args.action == "tag":
        print(f"#{args.id} tags: {candidates.set_tags(store, args.id, args.tags) or '(none)'}")
    elif args.action == "delete":
        name = candidates.get_candidate(store, args.id)["name"]
        if not args.yes:
            raise ShrinkError(f"Deleting #{args.id} ('{name}') needs --yes to confirm.")
        candidates.delete(store, args.id)
        print(f"deleted #{args.id} ('{name}'); its results stay in the store")
    else:
        out = check_writable(args.out, "--out", directory=True)
        files = candidates.export_files(store, args.id)
        out.mkdir(parents=True, exist_ok=True)
        for filename, text in files.items():
            path = out / f"candidate-{args.id}-{filename}"
            path.write_text(text, encoding="utf-8")
            print(path)
    return 0
