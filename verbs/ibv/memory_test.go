//go:build linux && cgo

package ibv

import (
	"testing"

	"github.com/vsdp/vsdp/verbs"
)

// TestBindOK is a table of the type-2 bind rules the provider predicts
// (IBA 10.6.7.2.2) to keep MW.Bound and the region's window count.
func TestBindOK(t *testing.T) {
	p1, p2 := &pd{}, &pd{}
	const base = 0x10000
	region := func(acc verbs.Access) *mr {
		return &mr{pd: p1, addr: base, buf: make([]byte, 4096), access: acc}
	}
	full := verbs.AccessLocalWrite | verbs.AccessMWBind
	tests := []struct {
		name  string
		q     *qp
		w     *mw
		m     *mr
		b     verbs.Bind
		valid bool
	}{
		{"inside", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base + 100, Length: 100, Access: verbs.AccessRemoteRead}, true},
		{"whole region", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x12ff, Addr: base, Length: 4096, Access: verbs.AccessRemoteWrite | verbs.AccessRemoteRead}, true},
		{"empty at the end", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base + 4096, Length: 0, Access: verbs.AccessRemoteRead}, true},
		{"past the end", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base + 4000, Length: 97, Access: verbs.AccessRemoteRead}, false},
		{"before the start", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base - 1, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"length overflows", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base + 1, Length: ^uint64(0), Access: verbs.AccessRemoteRead}, false},
		{"index changed", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1301, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"already bound", &qp{pd: p1}, &mw{pd: p1, key: 0x1200, bound: true}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"window closed", &qp{pd: p1}, &mw{pd: p1, key: 0x1200, closed: true}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"region closed", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, &mr{pd: p1, addr: base, buf: make([]byte, 4096), access: full, closed: true},
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"window of another PD", &qp{pd: p1}, &mw{pd: p2, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"region of another PD", &qp{pd: p2}, &mw{pd: p2, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"region without MW_BIND", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(verbs.AccessLocalWrite),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteRead}, false},
		{"remote write without local write", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(verbs.AccessMWBind),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessRemoteWrite}, false},
		{"no rights", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10}, false},
		{"local right asked", &qp{pd: p1}, &mw{pd: p1, key: 0x1200}, region(full),
			verbs.Bind{RKey: 0x1201, Addr: base, Length: 10, Access: verbs.AccessLocalWrite | verbs.AccessRemoteRead}, false},
	}
	for _, tt := range tests {
		if got := bindOK(tt.q, tt.w, tt.m, &tt.b); got != tt.valid {
			t.Errorf("%s: bindOK = %v, want %v", tt.name, got, tt.valid)
		}
	}
}

// TestWindowBookkeeping: a recorded bind counts against the region and
// re-keys the window; unbinding undoes both.
func TestWindowBookkeeping(t *testing.T) {
	d := &Device{windows: map[uint32]*mw{}}
	m := &mr{dev: d}
	w := &mw{dev: d, key: 0x1200}
	d.windows[w.key] = w
	q := &qp{}
	w.bind(q, m, 0x1201)
	if !w.bound || w.key != 0x1201 || m.windows != 1 || d.windows[0x1201] != w || d.windows[0x1200] != nil {
		t.Fatalf("after bind: %+v, region windows %d, table %v", w, m.windows, d.windows)
	}
	d.remoteInvalidated(0x1200) // a stale key: nothing happens
	if !w.bound {
		t.Fatal("a stale key unbound the window")
	}
	d.remoteInvalidated(0x1201)
	if w.bound || m.windows != 0 || w.m != nil || w.q != nil {
		t.Fatalf("after remote invalidation: %+v, region windows %d", w, m.windows)
	}
	w.unbind() // idempotent
	if m.windows != 0 {
		t.Fatalf("second unbind: region windows %d", m.windows)
	}
}
