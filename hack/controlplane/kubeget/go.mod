// kubeget for the local node's test image (see main.go); the standard library only.
module capgate.dev/hack/controlplane/kubeget

go 1.26
