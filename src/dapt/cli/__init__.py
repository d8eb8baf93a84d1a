"""The command line: argv, recipes and --ds files into a validated config (every problem at once), and the entry
point that runs a task with dapt's exit codes. Imports the layers below, never a task."""
