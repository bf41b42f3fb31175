"""Cluster-facing code: what each phase asks Ray for, GPU-hour accounting, planning."""
