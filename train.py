"""Train or evaluate a target network with LightningCLI.

    python train.py fit  --config configs/resnet56_cifar10/pretrain.yaml
    python train.py test --config configs/resnet56_cifar10/pretrain.yaml --ckpt_path <ckpt>

After ``fit`` the best checkpoint's network (by val/acc) is also written as a network file,
``<log_dir>/network.pt``, the input format of the zoo and pruning stages.
"""
import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared CPU
# machine, spinning threads of two jobs starve each other: a ResNet-20 step measured 3.0 s
# with the default policy and 0.30 s with PASSIVE while another job ran (0.22 s alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.train import main  # noqa: E402

if __name__ == "__main__":
    main()
