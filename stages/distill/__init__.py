"""Distillation stage: losses (losses.py), the dynamic loss balancer (balancer.py), the teacher-feature queue
(queue.py). Nothing is imported here so that the stage's light cli.py can load without torch."""
