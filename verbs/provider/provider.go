package provider

import (
	"fmt"

	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
)

// Provider names.
const (
	Soft = "soft"
	IBV  = "ibv"
	Auto = "auto"
)

// Options configure Open. The zero value gives a soft provider with no
// devices.
type Options struct {
	// Soft are the soft provider's devices (its configuration: fabric
	// addresses, address table, transport).
	Soft []soft.Options
}

// Open returns the provider named name: Soft, IBV or Auto (the empty name
// is Auto). IBV fails with an error wrapping verbs.ErrNotSupported in a
// build without cgo. Auto picks IBV when it lists at least one device, Soft
// otherwise.
func Open(name string, o Options) (verbs.Provider, error) {
	switch name {
	case Soft:
		return soft.NewProvider(o.Soft...), nil
	case IBV:
		p := ibvProvider()
		if p == nil {
			return nil, fmt.Errorf("%w: provider %q: this build has no cgo (rdma-core)", verbs.ErrNotSupported, IBV)
		}
		return p, nil
	case Auto, "":
		p := ibvProvider()
		if p == nil {
			return soft.NewProvider(o.Soft...), nil
		}
		devs, err := p.Devices()
		if err != nil {
			return nil, fmt.Errorf("provider: listing RDMA devices: %w", err)
		}
		if len(devs) > 0 {
			return p, nil
		}
		return soft.NewProvider(o.Soft...), nil
	}
	return nil, fmt.Errorf("%w: provider %q (want %q, %q or %q)", verbs.ErrInvalid, name, Soft, IBV, Auto)
}

// HasIBV reports whether this build includes the rdma-core provider.
func HasIBV() bool { return ibvProvider() != nil }
