"""Property-based fuzz tests of the parsers an attacker (or a careless operator) reaches: OCSP
requests (DER, the GET path's base64, ``ocsp serve``'s HTTP/1.1), CSR intake, the command
line's text parsers, HTTP conditional fields and the settings file.

Each test states one contract (what the parser may raise, how long it may take) and checks it
on random input and on mutations of valid input. Hypothesis runs derandomized (the same
examples on every run, no example database), so CI is deterministic; the regression tests
carry the inputs the fuzz campaign found inline.
"""
