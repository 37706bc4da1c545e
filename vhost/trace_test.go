package vhost_test

import (
	"strings"
	"testing"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/vhosttest"
	"github.com/vsdp/vsdp/vhost/vsock"
)

// TestReplayQEMUTrace replays the conversation recorded from QEMU 7.2 and a
// Debian 6.1 guest (vmtest's TestVMQEMUTrace: boot, unloading and
// reloading the vsock transport, system_reset) against the back-end with
// its vsock device, substituting fresh memfds and eventfds, and checks that
// every reply matches the recorded one.
func TestReplayQEMUTrace(t *testing.T) {
	vhosttest.CheckLeaks(t)
	tr, err := vhosttest.LoadTrace("testdata/qemu72-vsock-trace.json")
	if err != nil {
		t.Fatal(err)
	}
	reqs := strings.Join(tr.Requests(), " ")
	for _, want := range []string{"GET_CONFIG", "ADD_MEM_REG", "SET_VRING_ENABLE", "GET_VRING_BASE", "SET_FEATURES"} {
		if !strings.Contains(reqs, want) {
			t.Fatalf("trace lacks %s: %s", want, reqs)
		}
	}
	srv := &vhost.Server{NewDevice: func() (vhost.Device, error) {
		return vsock.New(vsock.Config{CID: 42}, refuseAll{})
	}}
	defer srv.Close()
	f, done, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	mism, err := vhosttest.Replay(f, tr)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mism {
		t.Error(m)
	}
	f.Close()
	if err := <-done; err != nil {
		t.Errorf("session ended with %v", err)
	}
	if st := srv.Stats(); st.RingsStarted != 6 || st.RingsStopped != 6 {
		t.Errorf("rings started %d, stopped %d; want 6 and 6 (3 starts of 2 rings; stops at rmmod, reset and disconnect)", st.RingsStarted, st.RingsStopped)
	}
}

type refuseAll struct{}

func (refuseAll) Connect(r *vsock.Request) { r.Refuse() }
