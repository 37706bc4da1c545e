package provider

import (
	"errors"
	"os"
	"testing"

	"github.com/vsdp/vsdp/verbs"
	"github.com/vsdp/vsdp/verbs/soft"
)

// rdmaDevices reports whether the kernel lists RDMA devices (this build's
// ibv provider would find them).
func rdmaDevices(t *testing.T) bool {
	t.Helper()
	ents, err := os.ReadDir("/sys/class/infiniband")
	return err == nil && len(ents) > 0
}

func TestOpen(t *testing.T) {
	o := Options{Soft: []soft.Options{{Name: "s0"}}}
	tests := []struct {
		name     string
		want     string // provider name, or "" for an error
		wantErr  error
		needsIBV bool
	}{
		{name: Soft, want: "soft"},
		{name: "bogus", wantErr: verbs.ErrInvalid},
		{name: "SOFT", wantErr: verbs.ErrInvalid},
		{name: IBV, want: "ibv", needsIBV: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Open(tt.name, o)
			if tt.needsIBV && !HasIBV() {
				if !errors.Is(err, verbs.ErrNotSupported) {
					t.Fatalf("Open(%q) without cgo = %v, want ErrNotSupported", tt.name, err)
				}
				return
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Open(%q) = %v, want %v", tt.name, err, tt.wantErr)
				}
				return
			}
			if err != nil || p.Name() != tt.want {
				t.Fatalf("Open(%q) = %v, %v; want provider %q", tt.name, p, err, tt.want)
			}
		})
	}
}

// TestAuto: ibv where the kernel has RDMA devices and this build has cgo,
// soft (with the given devices) otherwise.
func TestAuto(t *testing.T) {
	o := Options{Soft: []soft.Options{{Name: "s0"}}}
	for _, name := range []string{Auto, ""} {
		p, err := Open(name, o)
		if err != nil {
			t.Fatalf("Open(%q): %v", name, err)
		}
		want := "soft"
		if HasIBV() && rdmaDevices(t) {
			want = "ibv"
		}
		if p.Name() != want {
			t.Errorf("Open(%q) chose %q, want %q (cgo %v)", name, p.Name(), want, HasIBV())
		}
		if p.Name() == "soft" {
			devs, err := p.Devices()
			if err != nil || len(devs) != 1 || devs[0].Name != "s0" {
				t.Errorf("soft devices %+v, %v; want s0", devs, err)
			}
		}
	}
}
