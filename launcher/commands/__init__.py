"""The CLI's commands, a module each: parse flags, call the library, render text or --json.

launcher/cli.py registers them on the `gemma-launch` group."""
