package echo_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/echo"
	"github.com/vsdp/vsdp/vhost/vhosttest"
)

type devices struct {
	mu   sync.Mutex
	list []*echo.Device
}

func (d *devices) add(x *echo.Device) { d.mu.Lock(); d.list = append(d.list, x); d.mu.Unlock() }

func (d *devices) get(i int) *echo.Device {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.list[i]
}

func newServer(t testing.TB, o echo.Options) (*vhost.Server, *devices) {
	devs := &devices{}
	srv := &vhost.Server{NewDevice: echo.Factory(o, devs.add)}
	t.Cleanup(func() { srv.Close() })
	return srv, devs
}

// start connects a fake front-end over a socketpair and runs QEMU 7.2's
// realize and DRIVER_OK sequences.
func start(t testing.TB, srv *vhost.Server, o vhosttest.DeviceOptions) (*vhosttest.Device, <-chan error) {
	t.Helper()
	f, done, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	d, err := f.Init(o)
	if err != nil {
		t.Fatalf("init: %v", err)
	}
	t.Cleanup(d.Close)
	if err := d.Start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	return d, done
}

func TestEchoEndToEnd(t *testing.T) {
	for _, tc := range []struct{ eventIdx, indirect bool }{
		{false, false}, {true, false}, {false, true}, {true, true},
	} {
		t.Run(fmt.Sprintf("eventidx=%v/indirect=%v", tc.eventIdx, tc.indirect), func(t *testing.T) {
			vhosttest.CheckLeaks(t)
			srv, devs := newServer(t, echo.Options{})
			d, done := start(t, srv, vhosttest.DeviceOptions{MemSize: 64 << 20, EventIdx: tc.eventIdx, Indirect: tc.indirect})
			if got := devs.get(0).Features(); got != d.Features {
				t.Fatalf("device acked features %#x, front-end sent %#x", got, d.Features)
			}
			rng := rand.New(rand.NewPCG(1, uint64(len(t.Name()))))
			msgs := vhosttest.RandomMessages(rng, 150, 1, 64<<10)
			tr := &vhosttest.Loopback{RX: d.Queues[echo.RX], TX: d.Queues[echo.TX], RxSize: 64 << 10, MaxSegs: 4, Indirect: tc.indirect, Rand: rng, Keep: true}
			recv, err := tr.Run(msgs)
			chains := tr.Chains
			if err != nil {
				t.Fatal(err)
			}
			if chains != len(msgs) {
				t.Fatalf("%d rx chains for %d messages (each fits one)", chains, len(msgs))
			}
			for i := range msgs {
				if vhosttest.Digest(recv[i]) != vhosttest.Digest(msgs[i]) {
					t.Fatalf("message %d (%d bytes): sha256 differs (got %d bytes)", i, len(msgs[i]), len(recv[i]))
				}
			}
			st := devs.get(0).Stats()
			if st.Messages != uint64(len(msgs)) || st.RxChains != uint64(chains) {
				t.Fatalf("device stats %+v, want %d messages, %d chains", st, len(msgs), chains)
			}
			f := d.F
			f.Close()
			if err := <-done; err != nil {
				t.Fatalf("session ended with %v, want nil after a clean disconnect", err)
			}
			ss := srv.Stats()
			if ss.RingsStarted != 2 || ss.RingsStopped != 2 || ss.RingsBroken != 0 || ss.Rejected != 0 {
				t.Fatalf("server stats %+v", ss)
			}
		})
	}
}

// RX buffers smaller than the messages: each message spans several RX
// chains (like vsock's 3776-byte guest buffers) and the stream must be
// intact.
func TestEchoSplitAcrossRxChains(t *testing.T) {
	vhosttest.CheckLeaks(t)
	srv, _ := newServer(t, echo.Options{})
	d, _ := start(t, srv, vhosttest.DeviceOptions{MemSize: 32 << 20, EventIdx: true})
	rng := rand.New(rand.NewPCG(2, 2))
	msgs := vhosttest.RandomMessages(rng, 100, 1, 20000)
	tr := &vhosttest.Loopback{RX: d.Queues[echo.RX], TX: d.Queues[echo.TX], RxSize: 3776, MaxSegs: 3, Rand: rng}
	recv, err := tr.Run(msgs)
	chains := tr.Chains
	if err != nil {
		t.Fatal(err)
	}
	want := 0
	for _, m := range msgs {
		want += (len(m) + 3775) / 3776
	}
	if chains != want {
		t.Fatalf("%d rx chains, want %d (messages never share a chain)", chains, want)
	}
	if vhosttest.Digest(recv[0]) != vhosttest.Digest(msgs...) {
		t.Fatal("stream sha256 differs")
	}
}

// Few RX buffers and a full TX ring: TX waits for RX (back-pressure), and
// every RX kick resumes it.
func TestEchoBackPressure(t *testing.T) {
	vhosttest.CheckLeaks(t)
	srv, devs := newServer(t, echo.Options{Budget: 3})
	d, _ := start(t, srv, vhosttest.DeviceOptions{QueueSize: 16})
	rng := rand.New(rand.NewPCG(3, 3))
	msgs := vhosttest.RandomMessages(rng, 200, 1, 3000)
	tr := &vhosttest.Loopback{RX: d.Queues[echo.RX], TX: d.Queues[echo.TX], RxSize: 4096, RxLimit: 1, Rand: rng, Keep: true}
	recv, err := tr.Run(msgs)
	if err != nil {
		t.Fatal(err)
	}
	for i := range msgs {
		if !bytes.Equal(recv[i], msgs[i]) {
			t.Fatalf("message %d differs", i)
		}
	}
	if got := devs.get(0).Stats().Messages; got != 200 {
		t.Fatalf("device echoed %d messages, want 200", got)
	}
}

// QEMU 7.2 stops rings (SET_VRING_ENABLE 0, GET_VRING_BASE) at guest
// reboot and starts them again: the back-end reports where it stopped and
// resumes from there.
func TestEchoStopAndResume(t *testing.T) {
	vhosttest.CheckLeaks(t)
	srv, _ := newServer(t, echo.Options{})
	d, _ := start(t, srv, vhosttest.DeviceOptions{})
	rng := rand.New(rand.NewPCG(4, 4))
	for round := range 3 {
		msgs := vhosttest.RandomMessages(rng, 40, 1, 5000)
		tr := &vhosttest.Loopback{RX: d.Queues[echo.RX], TX: d.Queues[echo.TX], RxSize: 8192, Rand: rng, Keep: true}
		recv, err := tr.Run(msgs)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i := range msgs {
			if !bytes.Equal(recv[i], msgs[i]) {
				t.Fatalf("round %d message %d differs", round, i)
			}
		}
		// Leave RX buffers posted: the stopped device must not touch them.
		bases, err := d.Stop()
		if err != nil {
			t.Fatal(err)
		}
		for i, q := range d.Queues {
			if want := q.AvailIdx() - uint16(q.Outstanding()); bases[i] != want {
				t.Fatalf("round %d: queue %d base %d, want %d", round, i, bases[i], want)
			}
		}
		if err := d.Start(); err != nil {
			t.Fatalf("restart: %v", err)
		}
	}
	if st := srv.Stats(); st.RingsStarted != 8 || st.RingsStopped != 6 {
		t.Fatalf("stats %+v, want 8 starts and 6 stops", st)
	}
}

func TestEchoConfigSpace(t *testing.T) {
	vhosttest.CheckLeaks(t)
	srv, _ := newServer(t, echo.Options{Config: []byte{4, 0, 0, 0, 0, 0, 0, 0}})
	f, _, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := f.Init(vhosttest.DeviceOptions{ConfigSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Protocol&vhost.ProtocolConfig == 0 {
		t.Fatal("CONFIG not offered by a device with config space")
	}
	if !bytes.Equal(d.Config, []byte{4, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("config %v", d.Config)
	}
	if err := f.SetConfig(2, []byte{9, 9}, vhost.ConfigWritable); err != nil {
		t.Fatal(err)
	}
	got, err := f.GetConfig(0, 8)
	if err != nil || !bytes.Equal(got, []byte{4, 0, 9, 9, 0, 0, 0, 0}) {
		t.Fatalf("after SET_CONFIG: %v, %v", got, err)
	}
	for _, c := range []struct{ off, size uint32 }{{0, 9}, {8, 1}, {7, 2}} {
		if _, err := f.GetConfig(c.off, c.size); err == nil {
			t.Errorf("GET_CONFIG(%d, %d) beyond 8 bytes succeeded", c.off, c.size)
		}
	}
}

// Without config space the CONFIG feature is not offered and GET_CONFIG is
// rejected as not negotiated.
func TestEchoNoConfig(t *testing.T) {
	vhosttest.CheckLeaks(t)
	srv, _ := newServer(t, echo.Options{})
	f, _, err := vhosttest.Pair(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := f.Init(vhosttest.DeviceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Protocol&vhost.ProtocolConfig != 0 {
		t.Fatal("CONFIG offered without config space")
	}
	if _, err := f.GetConfig(0, 8); err == nil {
		t.Fatal("GET_CONFIG succeeded")
	}
}

// The legacy path (no PROTOCOL_FEATURES: rings enabled at SET_FEATURES) and
// SET_MEM_TABLE instead of ADD_MEM_REG.
func TestEchoLegacyAndMemTable(t *testing.T) {
	for _, o := range []vhosttest.DeviceOptions{
		{Legacy: true, Queues: 2},
		{Protocol: vhost.ProtocolMQ | vhost.ProtocolReplyAck},
	} {
		t.Run(fmt.Sprintf("legacy=%v", o.Legacy), func(t *testing.T) {
			vhosttest.CheckLeaks(t)
			srv, _ := newServer(t, echo.Options{})
			d, _ := start(t, srv, o)
			rng := rand.New(rand.NewPCG(5, 5))
			msgs := vhosttest.RandomMessages(rng, 30, 1, 9000)
			tr := &vhosttest.Loopback{RX: d.Queues[echo.RX], TX: d.Queues[echo.TX], RxSize: 9000, Rand: rng, Keep: true}
			recv, err := tr.Run(msgs)
			if err != nil {
				t.Fatal(err)
			}
			for i := range msgs {
				if !bytes.Equal(recv[i], msgs[i]) {
					t.Fatalf("message %d differs", i)
				}
			}
			want := vhost.ReqAddMemReg
			if o.Legacy || o.Protocol&vhost.ProtocolConfigureMemSlots == 0 {
				want = vhost.ReqSetMemTable
			}
			if srv.Stats().Messages[want] != 1 {
				t.Fatalf("memory not set up with %s", want)
			}
		})
	}
}
