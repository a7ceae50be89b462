"""Model spec -> loaded model, its inventory of compressible modules, a description, toy models for tests."""
