"""Driver side: config, plans, Ray placement and the pipeline that drives the stages."""
