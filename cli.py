"""Run cappo_pl: ``python cli.py fit --config configs/grpo.yaml`` (also ``validate``, ``sft``)."""

from cappo_pl.cli import main

if __name__ == "__main__":
    main()
