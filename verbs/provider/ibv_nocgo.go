//go:build !(linux && cgo)

package provider

import "github.com/vsdp/vsdp/verbs"

// ibvProvider is nil: the rdma-core provider needs cgo on Linux.
func ibvProvider() verbs.Provider { return nil }
