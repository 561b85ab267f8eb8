"""Watching runs and servers: `ds-monitor` (scrape, live view, report), the bottleneck rules, `ds profile`,
`ds logs analyze`, the training run's /metrics endpoint and the /dashboard page.

Modules: scrape (Prometheus text -> snapshots), series (quantiles, rates, views, facts), rules (thresholds and
findings), report (HTML + JSON), live (terminal view), cli (`ds-monitor`), exporter (training endpoint),
dashboard (the page's router), profile (torch.profiler over a few steps), logs (metrics.jsonl analyser).
"""
