"""HTML feature dashboards of SAE runs and side-by-side comparison pages (`vsae dashboard`, `vsae compare`).

gather.py: the one-pass statistics over a cache; weights.py: logit effects and decoder cosines; html.py and
assets.py: escaping, page skeleton, the page script; feature_pages.py / index_page.py: the dashboard's pages;
figures.py: shared plotly figures; run_info.py: reading run directories; build.py and compare.py: the drivers.
"""
