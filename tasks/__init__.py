"""Plain, typed functions for each concern, with thin Prefect @task wrappers beside them."""
