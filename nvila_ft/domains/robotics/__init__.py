"""The robotics pack: robot episodes as per-step records, discretised action text, action metrics, robot video and
episode generators."""
