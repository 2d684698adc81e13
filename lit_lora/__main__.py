"""``lit-lora`` (and ``python -m lit_lora``): one console command for every lit-lora command; the table
is :data:`lit_lora.config.commands.COMMANDS`."""

from lit_lora.cli import main

if __name__ == "__main__":
    main()
