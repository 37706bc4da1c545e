//go:build linux && cgo

package provider

import (
	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/ibv"
)

func ibvProvider() verbs.Provider { return ibv.New() }
