"""Operations tooling, apart from the apps: the launcher of local deployments
(``federation``), network-namespace federations (``netns``), the Fleet-only proxy
(``fleet_proxy``), warm ClientApps (``warm_clientapp``), the fast SuperNode
(``fast_supernode``), the per-user local SuperLink (``local_simulation``), a Ray
cluster in namespaces (``ray_cluster``) and ``runs`` (submit a run and wait for it).

Neither the ServerApp nor the ClientApp imports this package (an import contract in
pyproject.toml, checked by the tests), and the FAB a run ships leaves it out.
"""
