"""Running a federated arm across machines: a Flower SuperLink at the server, one SuperNode per hospital, TLS with
certificates from one command, and only registered site keys admitted.

- :mod:`synthlearn.deployment.credentials`: the consortium's CA, the server's certificate and one key pair per site;
- :mod:`synthlearn.deployment.apps`: the Flower app pair a deployed run loads (the same round protocol and message
  handling as in simulation, :mod:`synthlearn.federated.apps`);
- :mod:`synthlearn.deployment.runner`: starting the SuperLink and SuperNodes and carrying a protocol through them
  (what ``synthlearn server start`` and ``synthlearn site join`` run).
"""
