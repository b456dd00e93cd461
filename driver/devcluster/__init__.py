"""A local control plane (`controlplane`: etcd, kube-apiserver, scheduler,
controller-manager) and fake GPU nodes with the kubelet stand-in (`node`), for
`gpu-dra demo --cluster` and the tests. Never imported by the plugin: its extra dependency
(`cryptography`, for the control plane's certificates) is the `devcluster` extra.
"""
