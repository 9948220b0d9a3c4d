"""Human side-by-side evaluation: the study's store (SQLite), its web server and page. The job that creates, serves
and analyses a study is pipeline/human_eval.py; the statistics are in metrics/preference.py."""
