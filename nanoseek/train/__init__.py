"""Training: the shared loop and the pretrain / sft / grpo / distill stages."""
