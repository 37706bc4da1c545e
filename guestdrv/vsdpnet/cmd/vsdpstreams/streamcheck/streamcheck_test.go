package streamcheck

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestParseHeader(t *testing.T) {
	good := Header{Index: 7, Seed: 0x0102030405060708, Up: 1, Down: MaxSize}.Marshal()
	mut := func(f func(b []byte)) []byte {
		b := good
		f(b[:])
		return b[:]
	}
	for _, tc := range []struct {
		name string
		in   []byte
		ok   bool
	}{
		{"valid", good[:], true},
		{"short", good[:HeaderSize-1], false},
		{"long", append(good[:], 0), false},
		{"empty", nil, false},
		{"magic", mut(func(b []byte) { b[0] = 'X' }), false},
		{"up zero", mut(func(b []byte) { clear(b[16:24]) }), false},
		{"down zero", mut(func(b []byte) { clear(b[24:32]) }), false},
		{"up too big", mut(func(b []byte) { b[21] = 0x20; b[22] = 0; b[23] = 1 }), false},
		{"down too big", mut(func(b []byte) { b[24] = 0x80 }), false},
		{"up at max", mut(func(b []byte) { clear(b[16:24]); b[21] = 0x20 }), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ParseHeader(tc.in)
			if tc.ok != (err == nil) {
				t.Fatalf("ParseHeader(%x) = %+v, %v; want ok=%v", tc.in, h, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrHeader) {
				t.Fatalf("error %v is not ErrHeader", err)
			}
			if err == nil && h.Marshal() != [HeaderSize]byte(tc.in) {
				t.Fatalf("round trip of %x gave %x", tc.in, h.Marshal())
			}
		})
	}
}

func TestPlan(t *testing.T) {
	for _, tc := range []struct {
		n      int
		budget uint64
		ok     bool
	}{
		{0, 100, false},
		{MaxStreams + 1, 1 << 30, false},
		{10, 9, false},
		{1, 1, true},
		{10, 10, true},
		{50, 12 << 20, true},
		{MaxStreams, 1 << 30, true},
	} {
		t.Run(fmt.Sprintf("%d-streams-%d-bytes", tc.n, tc.budget), func(t *testing.T) {
			for seed := range uint64(20) {
				hs, err := Plan(seed, tc.n, tc.budget)
				if tc.ok != (err == nil) {
					t.Fatalf("Plan(%d, %d, %d): %v, want ok=%v", seed, tc.n, tc.budget, err, tc.ok)
				}
				if err != nil {
					if !errors.Is(err, ErrPlan) {
						t.Fatalf("error %v is not ErrPlan", err)
					}
					return
				}
				var up, down uint64
				for i, h := range hs {
					if h.Index != uint32(i) || h.Seed != seed || h.check() != nil {
						t.Fatalf("header %d: %+v", i, h)
					}
					up += h.Up
					down += h.Down
				}
				if up > tc.budget || down > tc.budget {
					t.Fatalf("seed %d: %d up, %d down: over the budget %d", seed, up, down, tc.budget)
				}
				if tc.n >= 2 && tc.budget >= 4*MaxSize && (hs[0] != Header{0, seed, 1, MaxSize} || hs[1] != Header{1, seed, MaxSize, 1}) {
					t.Fatalf("first two streams %+v %+v: want the 1-byte and MaxSize extremes", hs[0], hs[1])
				}
				again, _ := Plan(seed, tc.n, tc.budget)
				if fmt.Sprint(again) != fmt.Sprint(hs) {
					t.Fatal("plan is not deterministic")
				}
			}
		})
	}
	// Sizes spread over magnitudes: a big plan has small, medium and large
	// streams besides the two forced extremes.
	hs, _ := Plan(3, 200, 1<<40)
	var small, medium, large int
	for _, h := range hs[2:] {
		switch {
		case h.Up < 1<<10:
			small++
		case h.Up < 1<<17:
			medium++
		default:
			large++
		}
	}
	if small == 0 || medium == 0 || large == 0 {
		t.Fatalf("sizes not spread: %d small, %d medium, %d large", small, medium, large)
	}
}

func TestGen(t *testing.T) {
	// Fill in odd pieces equals one Fill; streams and directions differ.
	a := make([]byte, 1000)
	NewGen(5, 1, Up).Fill(a)
	g := NewGen(5, 1, Up)
	b := make([]byte, 0, 1000)
	for _, k := range []int{1, 7, 8, 9, 100, 875} {
		p := make([]byte, k)
		g.Fill(p)
		b = append(b, p...)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("piecewise Fill differs")
	}
	other := make([]byte, 1000)
	for _, g := range []*Gen{NewGen(5, 1, Down), NewGen(5, 2, Up), NewGen(6, 1, Up)} {
		g.Fill(other)
		if bytes.Equal(a, other) {
			t.Fatal("two streams have the same content")
		}
	}
	if Sum(5, 1, Up, 1000) != sha256.Sum256(a) {
		t.Fatal("Sum differs from the content's sha256")
	}
}

func TestParseReport(t *testing.T) {
	r := Report{Header: Header{Index: 3, Up: 10, Down: 20}, UpSum: sha256.Sum256([]byte("u")), DownSum: sha256.Sum256([]byte("d")),
		Local: "10.0.0.5:49152", Remote: "10.0.0.1:5000"}
	line := r.String()
	got, err := ParseReport(line)
	if err != nil || got != r {
		t.Fatalf("ParseReport(%q) = %+v, %v", line, got, err)
	}
	sum := fmt.Sprintf("%x", r.UpSum)
	for _, bad := range []string{
		"",
		strings.Replace(line, "stream=3", "stream=x", 1),
		strings.Replace(line, "stream=3", "stream=4294967296", 1),
		strings.Replace(line, "up=10", "up=0", 1),
		strings.Replace(line, "down=20", "down=99999999", 1),
		strings.Replace(line, sum, sum[:62], 1),
		strings.Replace(line, sum, "zz"+sum[2:], 1),
		strings.Replace(line, " local=10.0.0.5:49152", "", 1),
		line + " extra=1",
		line + " up=10",
		line + " junk",
	} {
		if _, err := ParseReport(bad); !errors.Is(err, ErrHeader) {
			t.Errorf("ParseReport(%q): %v, want ErrHeader", bad, err)
		}
	}
	rs, err := ParseReports("noise\n" + line + "\nstreams=1 summary\n")
	if err != nil || len(rs) != 1 || rs[3] != r {
		t.Fatalf("ParseReports: %v %v", rs, err)
	}
	if _, err := ParseReports(line + "\n" + line + "\n"); err == nil {
		t.Fatal("a stream reported twice was accepted")
	}
}

// tcpPair returns a connected loopback TCP pair.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := ln.Accept(); ch <- res{c, err} }()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return client, r.c
}

func TestRunServe(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	h := Header{Index: 4, Seed: 99, Up: 300000, Down: 123457}
	c, s := tcpPair(t)
	defer c.Close()
	type res struct {
		r   Report
		err error
	}
	ch := make(chan res, 1)
	go func() {
		r, err := Serve(ctx, s, func(got Header) error {
			if got != h {
				return fmt.Errorf("header %+v", got)
			}
			return nil
		})
		s.Close()
		ch <- res{r, err}
	}()
	cr, err := Run(ctx, c, h)
	if err != nil {
		t.Fatal(err)
	}
	if err := ExpectEOF(c, h, Down, h.Down); err != nil {
		t.Fatal(err)
	}
	sr := <-ch
	if sr.err != nil {
		t.Fatal(sr.err)
	}
	if cr.UpSum != Sum(99, 4, Up, h.Up) || cr.DownSum != Sum(99, 4, Down, h.Down) || sr.r.UpSum != cr.UpSum || sr.r.DownSum != cr.DownSum {
		t.Fatalf("sums differ: client %+v server %+v", cr, sr.r)
	}
	if cr.Local != sr.r.Remote || cr.Remote != sr.r.Local {
		t.Fatalf("addresses: client %s->%s, server %s->%s", cr.Local, cr.Remote, sr.r.Local, sr.r.Remote)
	}
}

// TestServeRejects: wrong content, short data, extra data and a header the
// caller refuses each fail the server with the matching error.
func TestServeRejects(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	h := Header{Index: 1, Seed: 3, Up: 100, Down: 10}
	good := make([]byte, h.Up)
	NewGen(h.Seed, h.Index, Up).Fill(good)
	hb := h.Marshal()
	flip := bytes.Clone(good)
	flip[57] ^= 1
	for _, tc := range []struct {
		name   string
		send   []byte
		accept func(Header) error
		want   error
		offset uint64
	}{
		{"flipped byte", append(hb[:], flip...), nil, ErrData, 57},
		{"short", append(hb[:], good[:99]...), nil, ErrData, 99},
		{"extra", append(append(hb[:], good...), 0), nil, ErrData, 100},
		{"refused header", append(hb[:], good...), func(Header) error { return ErrPlan }, ErrPlan, 0},
		{"bad magic", append([]byte("XXXX"), hb[4:]...), nil, ErrHeader, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := tcpPair(t)
			defer c.Close()
			defer s.Close()
			go func() {
				c.Write(tc.send)
				c.(*net.TCPConn).CloseWrite()
			}()
			_, err := Serve(ctx, s, tc.accept)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Serve: %v, want %v", err, tc.want)
			}
			var de *DataError
			if errors.As(err, &de) && de.Offset != tc.offset {
				t.Fatalf("offset %d, want %d (%v)", de.Offset, tc.offset, err)
			}
		})
	}
}

// buildC compiles the C implementation (guestdrv/testdata/vsdpstreams.c).
func buildC(t *testing.T) string {
	t.Helper()
	src, err := filepath.Abs(filepath.Join("..", "..", "..", "..", "testdata", "vsdpstreams.c"))
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "vsdpstreams")
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "gcc"
	}
	out, err := exec.Command(cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-o", bin, src,
		"-I"+filepath.Join(filepath.Dir(src), "..", "libvsdp"), "-ldl").CombinedOutput()
	if err != nil {
		t.Fatalf("building the C client (guestdrv/build.sh needs the same compiler): %v\n%s", err, out)
	}
	return bin
}

func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestCInterop holds the C implementation to this one: the same plans and
// content, and its epoll client and server against Run and Serve over
// loopback TCP (no libvsdp.so: plain sockets).
func TestCInterop(t *testing.T) {
	bin := buildC(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := func(args ...string) string {
		t.Helper()
		out, err := exec.CommandContext(ctx, bin, args...).Output()
		if err != nil {
			t.Fatalf("vsdpstreams %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	t.Run("plan", func(t *testing.T) {
		for _, p := range []struct {
			seed   uint64
			n      int
			budget uint64
		}{{1, 50, 12 << 20}, {0xdeadbeefcafe, 200, 1 << 40}, {7, 10, 10}} {
			hs, err := Plan(p.seed, p.n, p.budget)
			if err != nil {
				t.Fatal(err)
			}
			var want strings.Builder
			for _, h := range hs {
				fmt.Fprintf(&want, "%d %d %d\n", h.Index, h.Up, h.Down)
			}
			if got := c("plan", strconv.FormatUint(p.seed, 10), strconv.Itoa(p.n), strconv.FormatUint(p.budget, 10)); got != want.String() {
				t.Fatalf("plan %+v: C says\n%s\nGo says\n%s", p, got, want.String())
			}
		}
	})
	t.Run("content", func(t *testing.T) {
		for _, n := range []uint64{0, 1, 55, 56, 63, 64, 65, 1000, 4097, 300001} {
			for _, d := range []Dir{Up, Down} {
				got := strings.TrimSpace(c("sum", "12345", "9", d.String(), strconv.FormatUint(n, 10)))
				if want := fmt.Sprintf("%x", Sum(12345, 9, d, n)); got != want {
					t.Fatalf("%d bytes %s: C sha256 %s, Go %s", n, d, got, want)
				}
			}
		}
	})
	const seed, n, budget = 0xfeed, 50, 4 << 20
	plan, err := Plan(seed, n, budget)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("C client, Go server", func(t *testing.T) {
		fds, gs := fdCount(t), runtime.NumGoroutine()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		cmd := exec.CommandContext(ctx, bin, "dial", "127.0.0.1", port, strconv.Itoa(seed), strconv.Itoa(n), strconv.Itoa(budget))
		var stdout bytes.Buffer
		cmd.Stdout = &stdout
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		served := make(map[uint32]Report)
		var mu sync.Mutex
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for range n {
			conn, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				defer conn.Close()
				r, err := Serve(ctx, conn, func(h Header) error {
					if h != plan[h.Index%n] {
						return fmt.Errorf("header %+v not in the plan", h)
					}
					return nil
				})
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				served[r.Index] = r
				mu.Unlock()
			})
		}
		wg.Wait()
		ln.Close()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("C client: %v\n%s", err, stdout.String())
		}
		out := stdout.String()
		got, err := ParseReports(out)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != n || len(served) != n {
			t.Fatalf("%d client reports, %d served, want %d:\n%s", len(got), len(served), n, out)
		}
		for i, h := range plan {
			cr, sr := got[uint32(i)], served[uint32(i)]
			if cr.Header.Up != h.Up || cr.Header.Down != h.Down || cr.UpSum != sr.UpSum || cr.DownSum != sr.DownSum ||
				cr.UpSum != Sum(seed, h.Index, Up, h.Up) || cr.Local != sr.Remote || cr.Remote != sr.Local {
				t.Fatalf("stream %d: client %+v, server %+v", i, cr, sr)
			}
		}
		if !strings.Contains(out, fmt.Sprintf("streams=%d ", n)) || !strings.Contains(out, "preloaded=0") {
			t.Fatalf("summary missing:\n%s", out)
		}
		checkLeaks(t, fds, gs)
	})
	t.Run("Go clients, C server", func(t *testing.T) {
		fds, gs := fdCount(t), runtime.NumGoroutine()
		// The C server takes a fixed port: find a free one.
		probe, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := probe.Addr().String()
		probe.Close()
		release := filepath.Join(t.TempDir(), "release")
		cmd := exec.CommandContext(ctx, bin, "serve", strconv.Itoa(probe.Addr().(*net.TCPAddr).Port), strconv.Itoa(seed), strconv.Itoa(n), strconv.Itoa(budget), release)
		var stdout bytes.Buffer
		cmd.Stdout = &stdout
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var conns []net.Conn
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			c, err := net.Dial("tcp", addr)
			if err == nil {
				conns = append(conns, c)
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("C server never listened: %v", err)
			}
		}
		for len(conns) < n {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
		}
		reports := make([]Report, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i, c := range conns {
			wg.Go(func() { reports[i], errs[i] = Run(ctx, c, plan[i]) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		// Everything arrived: the server holds the streams until released.
		soon := time.Now().Add(50 * time.Millisecond)
		for _, c := range conns {
			c.SetReadDeadline(soon)
			if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("stream closed or sent more before the release: %v", err)
			}
			c.SetReadDeadline(time.Time{})
		}
		if err := os.WriteFile(release, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		for i, c := range conns {
			if err := ExpectEOF(c, plan[i], Down, plan[i].Down); err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("C server: %v\n%s", err, stdout.String())
		}
		got, err := ParseReports(stdout.String())
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range reports {
			sr := got[uint32(i)]
			if sr.UpSum != r.UpSum || sr.DownSum != r.DownSum || sr.Remote != r.Local || r.DownSum != Sum(seed, uint32(i), Down, plan[i].Down) {
				t.Fatalf("stream %d: client %+v, server %+v", i, r, sr)
			}
		}
		checkLeaks(t, fds, gs)
	})
}

// checkLeaks fails if descriptors or goroutines outlive a subtest.
func checkLeaks(t *testing.T, fds, gs int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		f, g := fdCount(t), runtime.NumGoroutine()
		if f <= fds && g <= gs {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("leak: %d fds (was %d), %d goroutines (was %d)", f, fds, g, gs)
		}
	}
}

func FuzzParseHeader(f *testing.F) {
	good := Header{Index: 1, Seed: 2, Up: 3, Down: 4}.Marshal()
	f.Add(good[:])
	f.Add([]byte("VSC1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		if m := h.Marshal(); !bytes.Equal(m[:], b) {
			t.Fatalf("round trip %x -> %x", b, m)
		}
	})
}

func FuzzParseReport(f *testing.F) {
	f.Add(Report{Header: Header{Index: 1, Up: 2, Down: 3}, Local: "a", Remote: "b"}.String())
	f.Add("stream=1 up=1")
	f.Fuzz(func(t *testing.T, line string) {
		r, err := ParseReport(line)
		if err != nil {
			return
		}
		if strings.ContainsAny(r.Local+r.Remote, " \t\n") {
			return // addresses are opaque; whitespace cannot round-trip
		}
		again, err := ParseReport(r.String())
		if err != nil || again != r {
			t.Fatalf("round trip of %q: %+v, %v", line, again, err)
		}
	})
}
