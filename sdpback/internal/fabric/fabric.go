package fabric

import (
	"net/netip"
	"testing"

	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/verbs/soft"
)

// Host is one stack's place on the fabric: its device's name and its
// fabric address.
type Host struct {
	Name string
	Addr netip.Addr
}

// Stacks opens a soft device and an SDP stack (default config) for each
// host, in order, all on one in-process network. When the test ends the
// stacks close, then each device fails the test if it still holds verbs
// objects, and closes.
func Stacks(t testing.TB, hosts ...Host) []*sdp.Stack {
	t.Helper()
	table := soft.NewTable()
	nw := soft.NewNetwork()
	devs := make([]*soft.Device, 0, len(hosts))
	stacks := make([]*sdp.Stack, 0, len(hosts))
	t.Cleanup(func() {
		for _, s := range stacks {
			s.Close()
		}
		for _, d := range devs {
			if r := d.Resources(); !r.Zero() {
				t.Errorf("%s leaked %v", d.Info().Name, r)
			}
			d.Close()
		}
	})
	for _, h := range hosts {
		d, err := soft.Open(soft.Options{Name: h.Name, Addrs: []netip.Addr{h.Addr}, Table: table, Network: nw})
		if err != nil {
			t.Fatal(err)
		}
		table.Set(h.Addr, d.Endpoint())
		devs = append(devs, d)
	}
	for i, h := range hosts {
		s, err := sdp.New(sdp.Config{Device: devs[i], Addr: h.Addr})
		if err != nil {
			t.Fatal(err)
		}
		stacks = append(stacks, s)
	}
	return stacks
}
