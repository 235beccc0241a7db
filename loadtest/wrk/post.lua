-- wrk script: a plain POST with an empty JSON body (the hello phase)
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
