"""Speed and memory measurement: device limits, XLA statistics, the benchmarked programs, block profiles."""
