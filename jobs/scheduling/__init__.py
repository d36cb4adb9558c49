"""segmill.jobs.scheduling: schedules that fire a job spec by cron and/or data conditions, each slot once.

`store` keeps schedules and their firing log in SQLite, `scheduler` decides what is due and fires it,
`conditions` reads the data (new labelled images, the champion's IoU) a condition watches.
"""
