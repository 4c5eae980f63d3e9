"""The job server: moeplat's spec functions over HTTP, a job queue in SQL, and workers that run jobs."""
