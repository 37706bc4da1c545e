package guestdrv

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

const confAllDevice = "use sdp client * *:*\nuse sdp server * *:*\n"

// TestConnectOutcomes runs connect() against every answer the host can
// give, blocking and not, on both test transports.
func TestConnectOutcomes(t *testing.T) {
	cases := []struct {
		name string
		plan Plan
		want string // the errno name connect reports, or OK
	}{
		{"ticket-ok", Plan{Kind: PlanTicket}, "OK"},
		{"ticket-refused", Plan{Kind: PlanTicket, Errno: syscall.ECONNREFUSED}, "ECONNREFUSED"},
		{"ticket-timeout", Plan{Kind: PlanTicket, Errno: syscall.ETIMEDOUT}, "ETIMEDOUT"},
		{"ticket-unreachable", Plan{Kind: PlanTicket, Errno: syscall.ENETUNREACH}, "ENETUNREACH"},
		{"ticket-refused-late-result", Plan{Kind: PlanTicket, Errno: syscall.EHOSTUNREACH, ResultDelay: 150 * time.Millisecond}, "EHOSTUNREACH"},
		{"deny", Plan{Kind: PlanDeny, Errno: syscall.EACCES}, "EACCES"},
		{"deny-unreach", Plan{Kind: PlanDeny, Errno: syscall.ENETUNREACH}, "ENETUNREACH"},
		{"deny-bad-errno", Plan{Kind: PlanDeny, Errno: syscall.Errno(99999)}, "EACCES"},
	}
	for _, tr := range transports {
		for _, mode := range []string{"block", "nb", "epoll"} {
			for _, c := range cases {
				t.Run(fmt.Sprintf("%v/%s/%s", tr, mode, c.name), func(t *testing.T) {
					h := newHost(t, tr)
					plan := c.plan
					plan.Local = netip.MustParseAddrPort("10.9.0.2:41000")
					h.SetDial(func(d Dial) Plan { return plan })
					r := runProg(t, h, writeConf(t, confAllDevice), "connect", "10.1.0.7", "5000", mode)
					r.want(t, "connect", c.want)
					var dials []netip.AddrPort
					for _, e := range h.Events() {
						if e.Msg.Type == ctl.TypeDial {
							dials = append(dials, e.Msg.Remote)
						}
					}
					if len(dials) != 1 || dials[0] != netip.MustParseAddrPort("10.1.0.7:5000") {
						t.Errorf("host saw DIALs %v, want one to 10.1.0.7:5000", dials)
					}
					nonBlockingTicket := mode != "block" && c.plan.Kind == PlanTicket
					// On TCP a device connect is asynchronous, as on vsock:
					// the errno arrives through SO_ERROR after writability.
					if nonBlockingTicket && tr == TCP {
						r.want(t, "inprogress", "1")
						if mode == "epoll" {
							r.want(t, "epollout", "1")
						} else {
							r.want(t, "pollout", "1")
						}
						want := c.want
						if want == "OK" {
							want = "0"
						}
						r.want(t, "so_error", want)
					}
					if c.want == "OK" {
						r.want(t, "sockname", "10.9.0.2:41000")
						r.want(t, "peername", "10.1.0.7:5000")
						r.want(t, "domain", "AF_INET")
					}
					if c.plan.Kind == PlanTicket {
						r.want(t, "c.swaps", "1")
						if c.want != "OK" && c.want != "ECONNREFUSED" {
							if r.num(t, "c.result_mapped") < 1 {
								t.Errorf("the errno did not come from RESULT:\n%s", r.out)
							}
						}
					} else {
						r.want(t, "c.swaps", "0")
					}
					if mode == "epoll" && c.plan.Kind == PlanTicket {
						r.want(t, "c.epoll_rereg", "1")
					}
				})
			}
		}
	}
}

// TestLocalFallback: the host answers LOCAL and the program's own TCP
// socket connects to a real loopback listener.
func TestLocalFallback(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			got := make(chan []byte, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- nil
					return
				}
				b, _ := io.ReadAll(c)
				c.Write(b)
				c.Close()
				got <- b
			}()
			h.SetDial(func(d Dial) Plan { return Plan{Kind: PlanLocal} })
			in, sum := randomFile(t, 100_000, 1)
			out := in + ".out"
			port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
			r := runProg(t, h, writeConf(t, confAllDevice), "echo", "127.0.0.1", port, in, out)
			r.want(t, "connect", "OK")
			r.want(t, "c.dials", "1")
			r.want(t, "c.locals", "1")
			r.want(t, "c.swaps", "0")
			if b := <-got; b == nil || len(b) != 100_000 {
				t.Fatalf("the loopback listener got %d bytes", len(b))
			}
			if s := fileSum(t, out); s != sum {
				t.Errorf("echo through the guest's TCP: sha256 %s, want %s", short(s), short(sum))
			}
		})
	}
}

// TestNoDevice: without a control service, `both` falls back to the
// guest's TCP and `sdp` fails with ENETUNREACH.
func TestNoDevice(t *testing.T) {
	needBuild(t)
	port := closingListener(t)
	dir := shortDir(t) // no ctl socket in it
	for _, c := range []struct{ conf, want, locals string }{
		{"use both client * *:*\n", "OK", "1"},
		{"use sdp client * *:*\n", "ENETUNREACH", "0"},
		{"use tcp client * *:*\n", "OK", "1"},
		{"# no rules: both\n", "OK", "1"},
	} {
		cmd := execProg(t, writeConf(t, c.conf), []string{"VSDP_TEST_UNIX_DIR=" + dir}, "connect", "127.0.0.1", port, "block")
		cmd.want(t, "connect", c.want)
		cmd.want(t, "c.locals", c.locals)
		cmd.want(t, "c.ctl_opens", "0")
	}
}

func execProg(t *testing.T, conf string, env []string, args ...string) result {
	t.Helper()
	h := (*FakeHost)(nil)
	cmdEnv := append(guestEnv(h, conf), env...)
	cmd := exec.Command(bin.prog, args...)
	cmd.Env = cmdEnv
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	r := parseKV(string(out))
	checkProgFDs(t, r)
	return r
}

// TestNames: getsockname and getpeername answer in AF_INET (or, for an
// AF_INET6 socket, v4-mapped AF_INET6) terms from RESULT.
func TestNames(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			h.SetDial(ticketFrom("10.9.0.2:41234"))
			conf := writeConf(t, confAllDevice)
			r := runProg(t, h, conf, "connect", "10.1.0.7", "5000", "block")
			r.want(t, "sockname", "10.9.0.2:41234")
			r.want(t, "peername", "10.1.0.7:5000")
			r.want(t, "domain", "AF_INET")
			r = runProg(t, h, conf, "connect", "::ffff:10.1.0.7", "5001", "nb")
			r.want(t, "sockname", "[::ffff:10.9.0.2]:41234")
			r.want(t, "peername", "[::ffff:10.1.0.7]:5001")
			r.want(t, "domain", "AF_INET6")
			h.SetDial(ticketFrom("[fd00::2]:41235"))
			r = runProg(t, h, conf, "connect", "fd00::7", "5002", "block")
			r.want(t, "sockname", "[fd00::2]:41235")
			r.want(t, "peername", "[fd00::7]:5002")
		})
	}
}

// TestEcho pushes data through a swapped descriptor and checks it by hash,
// on the host's side and back in the guest.
func TestEcho(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			sums := serveEcho(h)
			in, sum := randomFile(t, 3<<20, 2)
			out := in + ".out"
			r := runProg(t, h, writeConf(t, confAllDevice), "echo", "10.1.0.7", "9", in, out)
			r.want(t, "received", strconv.Itoa(3<<20))
			if got := <-sums; got != sum {
				t.Errorf("host received sha256 %s, want %s", short(got), short(sum))
			}
			if got := fileSum(t, out); got != sum {
				t.Errorf("guest received sha256 %s, want %s", short(got), short(sum))
			}
		})
	}
}

// TestDeferredBind: a socket bound before connect, under a server rule
// that sends binds to the device, holds its bind until connect decides;
// when a client rule then keeps the connection on the guest's own TCP,
// the library makes the deferred bind on the kernel's socket first, so the
// peer sees the bound port.
func TestDeferredBind(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peers := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		peers <- c.RemoteAddr().String()
		c.Close()
	}()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := free.Addr().(*net.TCPAddr).Port
	free.Close()
	h := newHost(t, Unix)
	conf := "use sdp server * *:*\nuse tcp client * 127.0.0.1:*\n"
	dst := ln.Addr().(*net.TCPAddr)
	r := runProg(t, h, writeConf(t, conf), "bindconnect", "127.0.0.1", strconv.Itoa(dst.Port), strconv.Itoa(port))
	r.want(t, "connect", "OK")
	r.want(t, "sockname", fmt.Sprintf("127.0.0.1:%d", port))
	r.want(t, "c.locals", "1")
	select {
	case p := <-peers:
		if p != fmt.Sprintf("127.0.0.1:%d", port) {
			t.Fatalf("the peer saw %s, want the bound port %d", p, port)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no connection reached the listener")
	}
}
