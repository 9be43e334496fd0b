"""Benchmarks behind `sdmp-fast bench ...`; all write the JSON format of common.write_results."""
