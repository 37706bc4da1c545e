package guestdrv

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/guestdrv/ctl"
)

// TestResetMidStream: the host's RESET turns the EOF/EPIPE a vsock RST
// produces into ECONNRESET, once for reading and once for writing, without
// SIGPIPE; afterwards the stream reads EOF and writes EPIPE (with SIGPIPE),
// as TCP does after a reset. AF_UNIX behaves as vsock here (a closed peer
// reads as EOF and EPIPE), so this runs on the Unix transport.
func TestResetMidStream(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.ECONNRESET, syscall.ETIMEDOUT} {
		t.Run(errno.Error(), func(t *testing.T) {
			h := newHost(t, Unix)
			h.SetDial(func(d Dial) Plan {
				return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
					s.Write(bytes.Repeat([]byte("z"), 1000))
					time.Sleep(50 * time.Millisecond)
					s.Reset(errno)
				}}
			})
			r := runProg(t, h, writeConf(t, confAllDevice), "reset", "10.1.0.7", "5000")
			name := map[syscall.Errno]string{syscall.ECONNRESET: "ECONNRESET", syscall.ETIMEDOUT: "ETIMEDOUT"}[errno]
			r.want(t, "read_total", "1000")
			r.want(t, "peek_err", name) // a peek reports without using it up
			r.want(t, "read_err", name)
			r.want(t, "read_again", "EOF")
			r.want(t, "write_err", name)
			r.want(t, "sigpipe_after_first", "0")
			r.want(t, "write_again", "EPIPE")
			r.want(t, "sigpipes", "1")
			r.want(t, "c.resets_mapped", "3") // peek, read, write
		})
	}
	// A close without RESET stays a clean close.
	t.Run("clean-close", func(t *testing.T) {
		h := newHost(t, Unix)
		h.SetDial(func(d Dial) Plan {
			return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
				s.Write(bytes.Repeat([]byte("z"), 1000))
				s.Close()
			}}
		})
		r := runProg(t, h, writeConf(t, confAllDevice), "reset", "10.1.0.7", "5000")
		r.want(t, "peek_err", "EOF")
		r.want(t, "read_err", "EOF")
		r.want(t, "write_err", "EPIPE")
		r.want(t, "c.resets_mapped", "0")
	})
}

// TestEpollSurvivesSwap registers the socket with epoll before connect();
// the swap replaces the open file, so only the library's re-registration
// lets EPOLLIN arrive.
func TestEpollSurvivesSwap(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			h.SetDial(func(d Dial) Plan {
				return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
					time.Sleep(100 * time.Millisecond)
					s.Write([]byte("hello"))
					io.Copy(io.Discard, s)
					s.Close()
				}}
			})
			r := runProg(t, h, writeConf(t, confAllDevice), "epoll", "10.1.0.7", "5000")
			r.want(t, "epollin", "1")
			r.want(t, "data", "hello")
			r.want(t, "c.epoll_rereg", "1")
		})
	}
}

// TestFork: the child opens its own control connection (HELLO with its
// pid) and dials on it; the parent's stream survives the child.
func TestFork(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			r := runProg(t, h, writeConf(t, confAllDevice), "fork", "10.1.0.7", "5000", "10.1.0.8", "6000")
			r.want(t, "child_connect", "OK")
			r.want(t, "child_status", "0")
			r.want(t, "parent_echo", "OK")
			parent, child := r.get(t, "parent_pid"), r.get(t, "child_pid")
			hello := map[int]string{}
			dialConn := map[string]int{}
			for _, e := range h.Events() {
				switch e.Msg.Type {
				case ctl.TypeHello:
					hello[e.Conn] = strconv.Itoa(int(e.Msg.PID))
				case ctl.TypeDial:
					dialConn[e.Msg.Remote.String()] = e.Conn
				}
			}
			if len(hello) != 2 {
				t.Fatalf("want two control connections, got HELLOs %v", hello)
			}
			if got := hello[dialConn["10.1.0.7:5000"]]; got != parent {
				t.Errorf("the parent's DIAL came on a connection of pid %s, want %s", got, parent)
			}
			if got := hello[dialConn["10.1.0.8:6000"]]; got != child {
				t.Errorf("the child's DIAL came on a connection of pid %s, want %s", got, child)
			}
			for _, e := range h.Events() {
				if e.Msg.Type == ctl.TypeAbort {
					t.Errorf("a close after fork sent ABORT: %+v", e.Msg)
				}
			}
		})
	}
}

// TestWaitAll: a MSG_WAITALL receive of 1 MiB (vsock fails those of
// 256 KiB or more) returns all of it, in pieces, from a trickling sender.
func TestWaitAll(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			in, sum := randomFile(t, 1<<20, 3)
			data, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			h.SetDial(func(d Dial) Plan {
				return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
					for off := 0; off < len(data); off += 100_000 {
						end := min(off+100_000, len(data))
						if _, err := s.Write(data[off:end]); err != nil {
							break
						}
						time.Sleep(5 * time.Millisecond)
					}
					io.Copy(io.Discard, s)
					s.Close()
				}}
			})
			out := in + ".out"
			r := runProg(t, h, writeConf(t, confAllDevice), "waitall", "10.1.0.7", "5000", strconv.Itoa(1<<20), out)
			r.want(t, "recv", strconv.Itoa(1<<20))
			if n := r.num(t, "c.waitall_chunks"); n < 8 {
				t.Errorf("MSG_WAITALL served in %d pieces, want at least 8 of at most 128 KiB", n)
			}
			if got := fileSum(t, out); got != sum {
				t.Errorf("sha256 %s, want %s", short(got), short(sum))
			}
		})
	}
}

// TestFIONREAD: the library answers FIONREAD on a device stream (vsock 6.1
// has no SIOCINQ; the test transports play that too).
func TestFIONREAD(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			h.SetDial(func(d Dial) Plan {
				return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
					s.Write(bytes.Repeat([]byte{7}, 12345))
					io.Copy(io.Discard, s)
					s.Close()
				}}
			})
			r := runProg(t, h, writeConf(t, confAllDevice), "fionread", "10.1.0.7", "5000", "12345")
			r.want(t, "fionread", "12345")
			if r.num(t, "c.inq_emulated") < 1 {
				t.Errorf("FIONREAD was not emulated:\n%s", r.out)
			}
		})
	}
}

// TestOptions: TCP-level options succeed on a device stream; NODELAY set
// before connect rides in DIAL's flags, later ones are forwarded as SETOPT
// with the stream's ports.
func TestOptions(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			streams := make(chan *Stream, 1)
			h.SetDial(func(d Dial) Plan {
				return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
					streams <- s
					b := make([]byte, 1)
					io.ReadFull(s, b)
					// close only once every SETOPT is in
					h.WaitEvent(func(e Event) bool {
						return e.Msg.Type == ctl.TypeSetOpt && e.Msg.Level == syscall.SOL_SOCKET
					}, 5*time.Second)
					s.Close()
				}}
			})
			r := runProg(t, h, writeConf(t, confAllDevice), "opts", "10.1.0.7", "5000")
			s := <-streams
			for k, v := range map[string]string{
				"keepidle_set": "OK", "nodelay_off": "OK", "nodelay_set": "OK", "nodelay_short": "EINVAL",
				"nodelay_get": "1", "keepidle_get": "30", "keepalive_set": "OK", "tos_set": "OK",
				"protocol": strconv.Itoa(syscall.IPPROTO_TCP),
			} {
				r.want(t, k, v)
			}
			var flags uint32
			for _, e := range h.Events() {
				if e.Msg.Type == ctl.TypeDial {
					flags = e.Msg.Flags
				}
			}
			if flags != ctl.DialNoDelay {
				t.Errorf("DIAL flags %#x, want NODELAY", flags)
			}
			type opt struct{ level, name, value int32 }
			var got []opt
			for _, e := range h.Events() {
				if e.Msg.Type != ctl.TypeSetOpt {
					continue
				}
				if e.Msg.GuestPort != s.GuestPort || e.Msg.HostPort != s.HostPort {
					t.Errorf("SETOPT for ports %d/%d, want the stream's %d/%d",
						e.Msg.GuestPort, e.Msg.HostPort, s.GuestPort, s.HostPort)
				}
				got = append(got, opt{e.Msg.Level, e.Msg.Name, e.Msg.Value})
			}
			want := []opt{
				{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, 30},
				{syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 0},
				{syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1},
				{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
			}
			if len(got) != len(want) {
				t.Fatalf("SETOPTs %v, want %v", got, want)
			}
			for i := range want {
				if got[i] != want[i] {
					t.Errorf("SETOPT %d = %v, want %v", i, got[i], want[i])
				}
			}
		})
	}
}

// TestCloseAbort: the last close of a stream with unread data, or with
// SO_LINGER {1, 0}, sends ABORT for its ports; a clean close and the close
// of one of two duplicates do not.
func TestCloseAbort(t *testing.T) {
	for _, tr := range transports {
		for _, c := range []struct {
			mode  string
			abort bool
		}{{"unread", true}, {"linger", true}, {"clean", false}, {"dup", true}} {
			t.Run(tr.String()+"/"+c.mode, func(t *testing.T) {
				h := newHost(t, tr)
				streams := make(chan *Stream, 1)
				h.SetDial(func(d Dial) Plan {
					return Plan{Kind: PlanTicket, Serve: func(s *Stream) {
						streams <- s
						s.Write(bytes.Repeat([]byte{1}, 100))
						io.Copy(io.Discard, s)
						s.Close()
					}}
				})
				r := runProg(t, h, writeConf(t, confAllDevice), "abort", "10.1.0.7", "5000", c.mode)
				s := <-streams
				var aborts []ctl.Msg
				for _, e := range h.Events() {
					if e.Msg.Type == ctl.TypeAbort {
						aborts = append(aborts, e.Msg)
					}
				}
				if !c.abort {
					if len(aborts) != 0 {
						t.Errorf("ABORT sent on a clean close: %+v", aborts)
					}
					return
				}
				if len(aborts) != 1 || aborts[0].GuestPort != s.GuestPort || aborts[0].HostPort != s.HostPort {
					t.Fatalf("ABORTs %+v, want one for %d/%d", aborts, s.GuestPort, s.HostPort)
				}
				if c.mode == "dup" && r.kv["dup_closed"] != "1" {
					t.Fatal("no dup step")
				}
			})
		}
	}
}

// TestAccept: listen registers with the host; accept pairs the connection
// with PEER and reports the remote AF_INET address; data echoes intact.
func TestAccept(t *testing.T) {
	for _, tr := range transports {
		for _, peer := range []bool{true, false} {
			name := tr.String() + "/peer"
			if !peer {
				name = tr.String() + "/who" // PEER missing: the library asks WHO
			}
			t.Run(name, func(t *testing.T) {
				h := newHost(t, tr)
				h.SetListen(func(l Listen) ListenPlan {
					return ListenPlan{Bound: netip.MustParseAddrPort("10.9.0.2:5000")}
				})
				p := startProg(t, h, writeConf(t, confAllDevice), "listen", "0.0.0.0", "5000")
				if got := p.waitKey(t, "listening"); got != "10.9.0.2:5000" {
					t.Errorf("getsockname of the listener = %s, want 10.9.0.2:5000", got)
				}
				l, err := h.WaitListener(0, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if l.Bind != netip.MustParseAddrPort("0.0.0.0:5000") || l.Backlog != 16 {
					t.Errorf("LISTEN %+v, want 0.0.0.0:5000 backlog 16", l.Listen)
				}
				remote := netip.MustParseAddrPort("10.2.0.1:33333")
				s, err := h.Call(l, remote, peer)
				if err != nil {
					t.Fatal(err)
				}
				in, sum := randomFile(t, 500_000, 4)
				data, _ := os.ReadFile(in)
				go func() { s.Write(data); s.CloseWrite() }()
				back, err := io.ReadAll(s)
				if err != nil {
					t.Fatal(err)
				}
				s.Close()
				r := p.wait(t)
				if got := sha256Sum(back); got != sum {
					t.Errorf("echo through an accepted stream: sha256 %s, want %s", short(got), short(sum))
				}
				r.want(t, "accept_peer", "10.2.0.1:33333")
				r.want(t, "accept_len", "16")
				r.want(t, "c.peername", "10.2.0.1:33333")
				r.want(t, "c.sockname", "10.9.0.2:5000")
				r.want(t, "c.domain", "AF_INET")
				r.want(t, "c.accepts", "1")
				if peer {
					r.want(t, "c.peers_missing", "0")
				} else {
					r.want(t, "c.peers_missing", "1")
				}
			})
		}
	}
}

// TestListenDenied: the host's DENY fails listen() with its errno.
func TestListenDenied(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			h.SetListen(func(l Listen) ListenPlan { return ListenPlan{Errno: syscall.EADDRINUSE} })
			r := runProg(t, h, writeConf(t, confAllDevice), "listen", "0.0.0.0", "5000")
			r.want(t, "listen", "EADDRINUSE")
			r.want(t, "c.denies", "1")
		})
	}
}

// TestDup: duplicates (dup2, F_DUPFD_CLOEXEC) keep the device stream's
// identity after the original is closed.
func TestDup(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			h.SetDial(ticketFrom("10.9.0.2:41000"))
			r := runProg(t, h, writeConf(t, confAllDevice), "dup", "10.1.0.7", "5000")
			r.want(t, "d.peername", "10.1.0.7:5000")
			r.want(t, "d.sockname", "10.9.0.2:41000")
			r.want(t, "f.peername", "10.1.0.7:5000")
			r.want(t, "echo", "OK")
			r.want(t, "c.aborts", "0")
		})
	}
}

// TestExecAdopt: a device stream inherited across exec (inetd-style) is
// recognised by asking the host WHO, and answers in AF_INET terms.
func TestExecAdopt(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			h.SetDial(ticketFrom("10.9.0.2:41000"))
			r := runProg(t, h, writeConf(t, confAllDevice), "exec", "10.1.0.7", "5000")
			r.want(t, "a.peername", "10.1.0.7:5000")
			r.want(t, "a.sockname", "10.9.0.2:41000")
			r.want(t, "a.domain", "AF_INET")
			r.want(t, "a.nodelay", "OK")
			r.want(t, "a.echo", "OK")
			r.want(t, "c.adopted", "1")
			who := 0
			for _, e := range h.Events() {
				if e.Msg.Type == ctl.TypeWho {
					who++
				}
			}
			if who == 0 {
				t.Error("the host was never asked WHO")
			}
		})
	}
}

// TestPassThrough: sockets the rules keep local, and sockets that are not
// TCP, are left alone; VSDP_DISABLE turns the library off.
func TestPassThrough(t *testing.T) {
	h := newHost(t, Unix)
	r := runProg(t, h, "", "passthru") // the built-in default: loopback is tcp
	r.want(t, "loopback", "OK")
	r.want(t, "unix_fionread", "0")
	r.want(t, "c.dials", "0")
	r.want(t, "c.swaps", "0")
	r.want(t, "c.ctl_opens", "0")
	// Disabled, a connect the rules send to the device goes to the
	// guest's TCP (a loopback listener here) and the host hears nothing.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	r = execProg(t, writeConf(t, confAllDevice), append(h.Env(), "VSDP_DISABLE=1"), "connect", "127.0.0.1", port, "block")
	r.want(t, "connect", "OK")
	r.want(t, "c.dials", "0")
	r.want(t, "c.locals", "0")
	if len(h.Events()) != 0 {
		t.Errorf("the host heard from a disabled library: %+v", h.Events())
	}
}

// TestThreads: many threads dial, move data and close at once (blocking and
// non-blocking connects mixed); every round must echo intact.
func TestThreads(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			r := runProg(t, h, writeConf(t, confAllDevice), "threads", "10.1.0.7", "5000", "8", "25")
			r.want(t, "threads_ok", "200")
			r.want(t, "c.dials", "200")
			r.want(t, "c.ctl_opens", "1")
			r.want(t, "c.protocol_errors", "0")
		})
	}
}

// TestStaleRecord: a device stream closed behind the library's back
// (fclose of an fdopen'ed socket) and its number reused by a socket the
// library never saw: the library answers for the new socket, not the old.
func TestStaleRecord(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			h := newHost(t, tr)
			r := runProg(t, h, writeConf(t, confAllDevice), "stale", "10.1.0.7", "5000")
			r.want(t, "reused", "1")
			r.want(t, "s.peername", "family-1") // AF_UNIX, from the kernel
			r.want(t, "s.fionread", "3")
			r.want(t, "c.aborts", "0")
		})
	}
}
