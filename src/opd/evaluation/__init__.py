"""Did it work, will it work: avg@k/pass@k evaluation, answer verification, the pre-flight
`doctor` and the start-up compatibility checks.
"""
