// CoreDNS for capgate's local test node, with only the plugins its Corefile uses (e2e/node.py).
//
// Why a wrapper instead of CoreDNS's own main: its main imports every plugin (cloud DNS providers,
// etcd, ...), which multiplies the modules to fetch and the build time. The directive order stays
// CoreDNS's own (core/dnsserver/zdirectives.go); plugins not linked here simply cannot be configured.
package main

import (
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
