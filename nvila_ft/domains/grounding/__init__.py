"""The grounding pack: referring expressions with box answers, the box format, IoU metrics, the mean-box baseline and
the synthetic grounding set."""
