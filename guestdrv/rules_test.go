package guestdrv

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
)

// harness talks to testdata/harness.c (built with ASan and UBSan), which
// runs the C rule parser and control codec.
type harness struct {
	mu  sync.Mutex
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

var (
	sharedHarness     *harness
	sharedHarnessErr  error
	sharedHarnessOnce sync.Once
)

// getHarness returns the process's harness (one per fuzz worker).
func getHarness(t testing.TB) *harness {
	t.Helper()
	needBuild(t)
	sharedHarnessOnce.Do(func() {
		cmd := exec.Command(bin.harness)
		cmd.Stderr = os.Stderr
		in, err := cmd.StdinPipe()
		if err != nil {
			sharedHarnessErr = err
			return
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			sharedHarnessErr = err
			return
		}
		if err := cmd.Start(); err != nil {
			sharedHarnessErr = err
			return
		}
		sharedHarness = &harness{cmd: cmd, in: in, out: bufio.NewReader(out)}
	})
	if sharedHarnessErr != nil {
		t.Fatal(sharedHarnessErr)
	}
	return sharedHarness
}

func (h *harness) call(t testing.TB, op byte, payload []byte) []byte {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	req := make([]byte, 5, 5+len(payload))
	req[0] = op
	binary.LittleEndian.PutUint32(req[1:], uint32(len(payload)))
	req = append(req, payload...)
	if _, err := h.in.Write(req); err != nil {
		t.Fatalf("harness died (see its sanitizer report above): %v", err)
	}
	var n [4]byte
	if _, err := io.ReadFull(h.out, n[:]); err != nil {
		t.Fatalf("harness died (see its sanitizer report above): %v", err)
	}
	b := make([]byte, binary.LittleEndian.Uint32(n[:]))
	if _, err := io.ReadFull(h.out, b); err != nil {
		t.Fatalf("harness died: %v", err)
	}
	return b
}

// parsed is the C parser's view of a configuration.
type parsed struct {
	rules []string // normalized, with "\t<line>"
	errs  []string // "<line> <message>"
	log   string   // "<dest> <level> <file>"
}

func parseConf(t testing.TB, text string) parsed {
	t.Helper()
	var p parsed
	for _, l := range strings.Split(strings.TrimSuffix(string(getHarness(t).call(t, 'P', []byte(text))), "\n"), "\n") {
		switch {
		case strings.HasPrefix(l, "R "):
			p.rules = append(p.rules, l[2:])
		case strings.HasPrefix(l, "E "):
			p.errs = append(p.errs, l[2:])
		case strings.HasPrefix(l, "L "):
			p.log = strings.TrimSpace(l[2:])
		}
	}
	return p
}

func match(t testing.TB, conf, role, prog, addr, port string) string {
	t.Helper()
	q := strings.Join([]string{role, prog, addr, port, conf}, "\x00")
	return strings.TrimSpace(string(getHarness(t).call(t, 'M', []byte(q))))
}

// TestRuleSyntax: every syntax form, its normalized reading, and every
// error with its line number.
func TestRuleSyntax(t *testing.T) {
	cases := []struct {
		name, text string
		rules      []string
		errs       []string
		log        string
	}{
		{"empty", "", nil, nil, "0 9"},
		{"comments and blanks", "# a comment\n\n   \t\n# use sdp client * *:*\n", nil, nil, "0 9"},
		{"wildcards", "use sdp client * *:*", []string{"use sdp client * *:*\t1"}, nil, "0 9"},
		{"bare star", "use tcp server * *", []string{"use tcp server * *:*\t1"}, nil, "0 9"},
		{"roles", "use sdp listen a *:*\nuse sdp connect b *:*",
			[]string{"use sdp server a *:*\t1", "use sdp client b *:*\t2"}, nil, "0 9"},
		{"actions", "use tcp client * *:*\nuse both client * *:*\nUSE SDP Client * *:*",
			[]string{"use tcp client * *:*\t1", "use both client * *:*\t2", "use sdp client * *:*\t3"}, nil, "0 9"},
		{"ipv4 host", "use sdp client * 10.1.0.7:80", []string{"use sdp client * 10.1.0.7/32:80\t1"}, nil, "0 9"},
		{"ipv4 prefix masked", "use sdp client * 10.1.2.3/8:80-90", []string{"use sdp client * 10.0.0.0/8:80-90\t1"}, nil, "0 9"},
		{"prefix 0", "use sdp client * 0.0.0.0/0:*", []string{"use sdp client * 0.0.0.0/0:*\t1"}, nil, "0 9"},
		{"odd prefix", "use sdp client * 192.168.255.255/17:1", []string{"use sdp client * 192.168.128.0/17:1\t1"}, nil, "0 9"},
		{"full port range", "use sdp client * *:0-65535", []string{"use sdp client * *:*\t1"}, nil, "0 9"},
		{"ipv6 bare", "use sdp client * fd00::/8:443", []string{"use sdp client * [fd00::]/8:443\t1"}, nil, "0 9"},
		{"ipv6 brackets", "use sdp client * [::1]:22", []string{"use sdp client * [::1]/128:22\t1"}, nil, "0 9"},
		{"ipv6 brackets prefix inside", "use sdp client * [fe80::/10]:*", []string{"use sdp client * [fe80::]/10:*\t1"}, nil, "0 9"},
		{"ipv4-mapped becomes ipv4", "use sdp client * ::ffff:10.0.0.0/104:*", []string{"use sdp client * 10.0.0.0/8:*\t1"}, nil, "0 9"},
		{"program pattern", "use sdp client ng?nx* *:*", []string{"use sdp client ng?nx* *:*\t1"}, nil, "0 9"},
		{"trailing comment", "use sdp client * *:80 # web", []string{"use sdp client * *:80\t1"}, nil, "0 9"},
		{"crlf", "use sdp client * *:80\r\n", []string{"use sdp client * *:80\t1"}, nil, "0 9"},
		{"log full", "log destination file /tmp/x.log min-level 3", nil, nil, "3 3 /tmp/x.log"},
		{"log syslog", "log min-level 1 destination syslog", nil, nil, "2 1"},
		{"log bare", "log", nil, nil, "1 9"},
		{"unknown statement", "usesdp client * *:*", nil, []string{"1 unknown statement usesdp (want use or log)"}, "0 9"},
		{"too few", "use sdp client *", nil, []string{"1 use: too few fields (want: use ACTION ROLE PROGRAM ADDR:PORT)"}, "0 9"},
		{"too many", "use sdp client * *:* x", nil, []string{"1 use: too many fields (want: use ACTION ROLE PROGRAM ADDR:PORT)"}, "0 9"},
		{"bad action", "use rdma client * *:*", nil, []string{"1 use: bad action rdma (want sdp, tcp or both)"}, "0 9"},
		{"bad role", "use sdp peer * *:*", nil, []string{"1 use: bad role peer (want server, listen, client or connect)"}, "0 9"},
		{"path program", "use sdp client /usr/bin/x *:*", nil, []string{"1 use: program /usr/bin/x is a name, not a path"}, "0 9"},
		{"bad address", "use sdp client * 10.1.0:80", nil, []string{"1 bad address 10.1.0 (want IPv4, IPv6 or *)"}, "0 9"},
		{"hostname", "use sdp client * example:80", nil, []string{"1 bad address example (want IPv4, IPv6 or *)"}, "0 9"},
		{"missing port", "use sdp client * 10.1.0.7", nil, []string{"1 bad address 10.1.0.7 (want ADDR[/PREFIX]:PORT[-PORT])"}, "0 9"},
		{"bad prefix", "use sdp client * 10.0.0.0/33:*", nil, []string{"1 bad prefix length /33"}, "0 9"},
		{"bad v6 prefix", "use sdp client * ::/129:*", nil, []string{"1 bad prefix length /129"}, "0 9"},
		{"prefix sign", "use sdp client * 10.0.0.0/+8:*", nil, []string{"1 bad prefix length /+8"}, "0 9"},
		{"bad port", "use sdp client * *:http", nil, []string{"1 bad port http (want N, N-M or *)"}, "0 9"},
		{"port too big", "use sdp client * *:65536", nil, []string{"1 bad port 65536 (want N, N-M or *)"}, "0 9"},
		{"reversed range", "use sdp client * *:90-80", nil, []string{"1 port range 90-80 is reversed"}, "0 9"},
		{"half range", "use sdp client * *:80-", nil, []string{"1 bad port range 80- (want N-M, 0-65535)"}, "0 9"},
		{"unbalanced bracket", "use sdp client * [::1:80", nil, []string{"1 bad address [::1 (unbalanced '[')"}, "0 9"},
		{"bad log", "log destination tty", nil, []string{"1 log: bad destination tty (want stderr, syslog or file PATH)"}, "0 9"},
		{"log level", "log min-level 0", nil, []string{"1 log: min-level needs a level from 1 to 9"}, "0 9"},
		{"log twice", "log min-level 2 min-level 3", nil, []string{"1 log: unexpected min-level (want destination or min-level, once each)"}, "0 9"},
		{"nul byte", "use sdp client * *:*\nuse\x00 sdp", []string{"use sdp client * *:*\t1"}, []string{"2 NUL byte in line"}, "0 9"},
		{"errors keep the good lines", "use sdp client * *:1\nbogus\nuse tcp client * *:2\nuse x client * *:3\n",
			[]string{"use sdp client * *:1\t1", "use tcp client * *:2\t3"},
			[]string{"2 unknown statement bogus (want use or log)", "4 use: bad action x (want sdp, tcp or both)"}, "0 9"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := parseConf(t, c.text)
			if fmt.Sprint(p.rules) != fmt.Sprint(c.rules) {
				t.Errorf("rules\n got %q\nwant %q", p.rules, c.rules)
			}
			if fmt.Sprint(p.errs) != fmt.Sprint(c.errs) {
				t.Errorf("errors\n got %q\nwant %q", p.errs, c.errs)
			}
			if strings.TrimSpace(p.log) != c.log {
				t.Errorf("log %q, want %q", p.log, c.log)
			}
		})
	}
}

// TestRuleMatch: roles, programs, prefixes, port ranges, families and the
// first match winning.
func TestRuleMatch(t *testing.T) {
	conf := strings.Join([]string{
		"use tcp client * 127.0.0.0/8:*",          // 1
		"use tcp client * [::1]:*",                // 2
		"use sdp client curl 10.1.0.0/16:80-89",   // 3
		"use both client curl *:*",                // 4
		"use tcp client ng?nx 10.0.0.0/8:*",       // 5
		"use sdp client * 10.0.0.0/8:443",         // 6
		"use sdp client * fd00::/8:*",             // 7
		"use tcp server * 127.0.0.1:*",            // 8
		"use sdp server redis* *:6379",            // 9
		"use both server * 10.9.0.0/24:1000-2000", // 10
		"use sdp client * 10.2.0.128/25:*",        // 11
		"use tcp client * *:7",                    // 12
	}, "\n")
	cases := []struct{ role, prog, addr, port, want string }{
		{"client", "curl", "127.0.0.1", "80", "tcp 1"},
		{"client", "curl", "127.255.255.255", "1", "tcp 1"},
		{"client", "x", "::1", "80", "tcp 2"},
		{"client", "curl", "10.1.0.7", "80", "sdp 3"},
		{"client", "curl", "10.1.0.7", "89", "sdp 3"},
		{"client", "curl", "10.1.0.7", "90", "both 4"},  // port outside the range: next rule
		{"client", "curl", "10.2.0.7", "80", "both 4"},  // prefix outside /16
		{"client", "nginx", "10.3.0.1", "443", "tcp 5"}, // ? wildcard, earlier than 6
		{"client", "ngnx", "10.3.0.1", "443", "sdp 6"},  // ? needs one character
		{"client", "wget", "10.3.0.1", "443", "sdp 6"},
		{"client", "wget", "10.3.0.1", "444", "none 0"}, // no match: the library uses both
		{"client", "wget", "fd12::1", "5", "sdp 7"},
		{"client", "wget", "fe80::1", "5", "none 0"},           // v6 outside the prefix
		{"client", "wget", "::ffff:10.3.0.1", "443", "none 0"}, // query as v6: no v4 rule applies here
		{"server", "redis", "127.0.0.1", "6379", "tcp 8"},      // roles are separate
		{"server", "redis-server", "0.0.0.0", "6379", "sdp 9"},
		{"server", "x", "10.9.0.2", "1500", "both 10"},
		{"server", "x", "10.9.1.2", "1500", "none 0"},
		{"client", "x", "10.2.0.200", "1", "sdp 11"},
		{"client", "x", "10.2.0.127", "1", "none 0"},
		{"client", "x", "10.2.0.127", "7", "tcp 12"},
		{"server", "x", "10.2.0.200", "1", "none 0"},
	}
	for _, c := range cases {
		t.Run(strings.Join([]string{c.role, c.prog, c.addr, c.port}, "_"), func(t *testing.T) {
			if got := match(t, conf, c.role, c.prog, c.addr, c.port); got != c.want {
				t.Errorf("got %q, want %q", got, c.want)
			}
		})
	}
	if got := match(t, "", "client", "x", "10.0.0.1", "1"); got != "none 0" {
		t.Errorf("empty configuration: %q", got)
	}
}

// TestShippedConfig: the default configuration parses without errors and
// keeps loopback local.
func TestShippedConfig(t *testing.T) {
	b, err := os.ReadFile("vsdp.conf")
	if err != nil {
		t.Fatal(err)
	}
	p := parseConf(t, string(b))
	if len(p.errs) != 0 || len(p.rules) == 0 {
		t.Fatalf("vsdp.conf: rules %q, errors %q", p.rules, p.errs)
	}
	for _, c := range []struct{ role, addr, want string }{
		{"client", "127.0.0.1", "tcp"}, {"server", "127.0.0.1", "tcp"}, {"client", "::1", "tcp"},
		{"client", "10.1.0.7", "both"}, {"server", "0.0.0.0", "both"},
	} {
		if got := match(t, string(b), c.role, "prog", c.addr, "80"); !strings.HasPrefix(got, c.want+" ") {
			t.Errorf("%s %s: %q, want %s", c.role, c.addr, got, c.want)
		}
	}
}

// TestConfTool: vsdp-conf reports errors with line numbers and decisions.
func TestConfTool(t *testing.T) {
	needBuild(t)
	conf := writeConf(t, "use sdp client curl 10.0.0.0/8:80\nnonsense\n")
	out, err := exec.Command(bin.conf, "-c", conf).CombinedOutput()
	if err == nil || !strings.Contains(string(out), conf+":2: unknown statement nonsense") ||
		!strings.Contains(string(out), "use sdp client curl 10.0.0.0/8:80\t# line 1") {
		t.Errorf("vsdp-conf on a bad file: %v\n%s", err, out)
	}
	good := writeConf(t, "use sdp client curl 10.0.0.0/8:80\n")
	out, err = exec.Command(bin.conf, "-c", good, "client", "curl", "10.4.4.4", "80").CombinedOutput()
	if err != nil || string(out) != "sdp\t# line 1\n" {
		t.Errorf("vsdp-conf decision: %v %q", err, out)
	}
	out, err = exec.Command(bin.conf, "-c", good, "client", "wget", "10.4.4.4", "80").CombinedOutput()
	if err != nil || string(out) != "both\t# no rule matched\n" {
		t.Errorf("vsdp-conf without a match: %v %q", err, out)
	}
}

// FuzzRules feeds any text to the C parser (under ASan/UBSan) and checks
// that what it accepts, written back in normal form, reads the same.
func FuzzRules(f *testing.F) {
	for _, s := range []string{
		"use sdp client * *:*", "use both server ng?nx [fe80::/10]:1-2 # c\nlog destination file /x min-level 2",
		"use tcp client * 10.0.0.0/8:80-90\n\n# x\nbogus", "use sdp client * ::ffff:10.0.0.0/104:*",
		"use sdp client * [::1:80", "\x00use", "use sdp client * *:65536-1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		p := parseConf(t, text)
		if len(p.rules) == 0 {
			return
		}
		var norm []string
		for _, r := range p.rules {
			rule, _, _ := strings.Cut(r, "\t")
			norm = append(norm, rule)
		}
		again := parseConf(t, strings.Join(norm, "\n"))
		if len(again.errs) != 0 || len(again.rules) != len(norm) {
			t.Fatalf("normal form %q re-read with errors %q", norm, again.errs)
		}
		for i, r := range again.rules {
			rule, _, _ := strings.Cut(r, "\t")
			if rule != norm[i] {
				t.Fatalf("rule %d: %q re-read as %q", i, norm[i], rule)
			}
		}
	})
}
