package soft

import (
	"net"
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/vsdp/vsdp/verbs/verbstest"
)

// fabric returns a verbstest.Fabric of two soft devices over one transport:
// "inproc", "tcp" (127.0.0.x loopback), "unix", or "handed" (a unix
// listener bound here and handed over in Options.Listener, as a parent
// process hands one to a worker).
func fabric(transport string, o Options) verbstest.Fabric {
	return func(t testing.TB) (verbstest.Side, verbstest.Side) {
		t.Helper()
		pa, aa := netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.2")
		tab := NewTable()
		n := NewNetwork()
		open := func(name string, addr netip.Addr, loop string) *Device {
			opts := o
			opts.Name, opts.Addrs, opts.Table = name, []netip.Addr{addr}, tab
			switch transport {
			case "inproc":
				opts.Network = n
			case "tcp":
				opts.Listen = Endpoint{Net: "tcp", Addr: loop + ":0"}
			case "unix":
				opts.Listen = Endpoint{Net: "unix", Addr: filepath.Join(t.TempDir(), name+".sock")}
			case "handed":
				ln, err := net.Listen("unix", filepath.Join(t.TempDir(), name+".sock"))
				if err != nil {
					t.Fatal(err)
				}
				opts.Listener = ln
			}
			d, err := Open(opts)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := d.Close(); err != nil {
					t.Errorf("close %s: %v", name, err)
				}
			})
			if err := tab.Set(addr, d.Endpoint()); err != nil {
				t.Fatal(err)
			}
			return d
		}
		p := open("passive", pa, "127.0.0.2")
		a := open("active", aa, "127.0.0.3")
		return verbstest.Side{Device: p, Addr: pa}, verbstest.Side{Device: a, Addr: aa}
	}
}

func TestConformance(t *testing.T) {
	for _, tr := range []string{"inproc", "tcp", "unix", "handed"} {
		t.Run(tr, func(t *testing.T) {
			defer checkLeaks(t)()
			verbstest.Run(t, fabric(tr, Options{}), verbstest.Config{})
		})
	}
}

// TestConformanceTwoHalves runs the suite the way two processes would:
// RunPassive and RunActive side by side on one pair of devices, meeting only
// through the connection manager (the active half retries until each
// listener exists).
func TestConformanceTwoHalves(t *testing.T) {
	t.Cleanup(checkLeaks(t)) // runs after the devices' cleanups
	passive, active := fabric("tcp", Options{})(t)
	cfg := verbstest.Config{BasePort: 19000}
	done := make(chan struct{})
	go func() {
		defer close(done)
		t.Run("passive", func(t *testing.T) { verbstest.RunPassive(t, passive, cfg) })
	}()
	t.Run("active", func(t *testing.T) { verbstest.RunActive(t, active, passive.Addr, cfg) })
	<-done
}

// A handed-over listener must be a stream transport the table can name.
func TestHandedListenerKind(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if d, err := Open(Options{Name: "x", Listener: packetListener{pc}}); err == nil {
		d.Close()
		t.Fatal("Open accepted a udp listener")
	}
}

// packetListener dresses a packet socket as a listener (its Addr says udp).
type packetListener struct{ pc net.PacketConn }

func (l packetListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (l packetListener) Close() error              { return l.pc.Close() }
func (l packetListener) Addr() net.Addr            { return l.pc.LocalAddr() }
