"""R1-Distill: make a small dense student from the reasoner — verified traces from the teacher
(`traces`), then sequence-level or logit-level knowledge distillation on the shared training core
(`train`), with the generalized JSD of GKD as the one divergence (`losses`)."""
