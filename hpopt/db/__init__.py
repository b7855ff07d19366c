"""The study database: a MariaDB server run as its own Slurm job (or a local background process).

`endpoint` reads the records every other module needs (where the server is, how to log in);
`server` starts, stops and inspects the job from the login node; `job` is what runs on the node;
`cli` is `hpopt db start | stop | status | url`.
"""
