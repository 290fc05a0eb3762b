"""Federated LoRA fine-tuning from the command line: the same flags and YAML as ``peft-fed train``.

    python examples/fed_train.py                       # offline default: MiniLM, WordNet MC, 10 clients, FedSmoothLoRA
    python examples/fed_train.py --method fedit --num_rounds 20 --output_dir runs/fedit
    torchrun --nproc_per_node 2 examples/fed_train.py --method fedsmoothlora   # 2 processes (accelerate launch on GPUs)
    python examples/fed_train.py --config examples/configs/wordnet_mc_minilm.yaml --zeta_schedule cosine
    python examples/fed_train.py --help                # every flag (run settings, hyperparameters, TrainingArguments)
"""

import sys

from peft_fed.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
