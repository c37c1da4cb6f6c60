"""CA core: profiles, rules, issuance, revocation, CRL building, the certificate store.

Pure by rule: functions here take ``now``, keys and sessions as arguments; they never read the
clock or the environment, and never import Flask.
"""
