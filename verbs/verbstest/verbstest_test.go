package verbstest

import (
	"bytes"
	"strings"
	"testing"
)

func TestPattern(t *testing.T) {
	a, b := pattern(1, 1000), pattern(1, 1000)
	if !bytes.Equal(a, b) || bytes.Equal(a, pattern(2, 1000)) {
		t.Fatal("pattern is not deterministic per seed")
	}
	if !bytes.Equal(pattern(1, 13), a[:13]) {
		t.Fatal("a shorter pattern is not a prefix")
	}
}

func TestPrivateDataCheck(t *testing.T) {
	sent := []byte("hello")
	for _, r := range []struct {
		got []byte
		ok  bool
	}{
		{[]byte("hello"), true},
		{append([]byte("hello"), 0, 0, 0), true}, // zero padding up to the limit
		{append([]byte("hello"), 0, 1), false},   // padding that is not zero
		{[]byte("hell"), false},
		{[]byte("jello"), false},
		{append([]byte("hello"), make([]byte, 10)...), false}, // beyond the limit of 8
	} {
		if err := privateData("REQ", r.got, sent, 8); (err == nil) != r.ok {
			t.Errorf("privateData(%q) = %v", r.got, err)
		}
	}
}

func TestDesc(t *testing.T) {
	d := desc{Addr: 0x7f0012345678, Len: 4096, RKey: 0xabcd01}
	got, err := parseDesc(d.bytes())
	if err != nil || got != d {
		t.Fatalf("round trip %+v %v", got, err)
	}
	if _, err := parseDesc(make([]byte, descLen-1)); err == nil {
		t.Fatal("short description accepted")
	}
}

func TestCases(t *testing.T) {
	names := map[string]bool{}
	for _, c := range Cases() {
		if c.Name == "" || c.Passive == nil || c.Active == nil || names[c.Name] {
			t.Errorf("case %+v", c.Name)
		}
		names[c.Name] = true
	}
	if len(Names()) != len(Cases()) {
		t.Error("Names and Cases disagree")
	}
}

func TestDeviations(t *testing.T) {
	names := map[string]bool{}
	for _, n := range Names() {
		names[n] = true
	}
	for _, p := range []string{ProviderSoft, ProviderRXE, "", "nonesuch"} {
		devs := Deviations(p)
		for n, reason := range devs {
			if !names[n] {
				t.Errorf("%s: deviation %q names no case", p, n)
			}
			if reason == "" {
				t.Errorf("%s: deviation %q has no reason", p, n)
			}
		}
		if got := len(Expected(p)) + len(devs); got != len(Names()) {
			t.Errorf("%s: %d expected + %d deviations != %d cases", p, len(Expected(p)), len(devs), len(Names()))
		}
	}
	if len(Deviations(ProviderSoft)) != 0 {
		t.Error("the pure-Go provider must pass every case")
	}
	if _, ok := Deviation(ProviderRXE, "Window"); !ok {
		t.Error("rxe's window deviation is not listed")
	}
	if _, ok := Deviation(ProviderRXE, "SendRecv"); ok {
		t.Error("a case rxe passes is listed")
	}
	// The list is data: a caller cannot change it through the copy.
	Deviations(ProviderRXE)["SendRecv"] = "x"
	if _, ok := Deviation(ProviderRXE, "SendRecv"); ok {
		t.Error("Deviations returned the list itself")
	}
}

func TestDeviationReporting(t *testing.T) {
	for _, r := range []struct {
		name       string
		cfg        Config
		wantSkip   bool
		wantRouted bool // failures go to the deviation's list, not t
	}{
		{"Window", Config{Provider: ProviderRXE}, true, false},
		{"Window", Config{Provider: ProviderRXE, CheckDeviations: true}, false, true},
		{"Window", Config{Provider: ProviderSoft}, false, false},
		{"Window", Config{}, false, false},
		{"SendRecv", Config{Provider: ProviderRXE}, false, false},
	} {
		var inner *testing.T
		var rep *reporter
		t.Run("case", func(t *testing.T) {
			inner = t
			rep = r.cfg.reporter(t, r.name)
		})
		if inner.Skipped() != r.wantSkip {
			t.Errorf("%s %+v: skipped %v, want %v", r.name, r.cfg, inner.Skipped(), r.wantSkip)
		}
		if !r.wantSkip && (rep.reason != "") != r.wantRouted {
			t.Errorf("%s %+v: reason %q", r.name, r.cfg, rep.reason)
		}
	}
	for _, r := range []struct {
		errs  []string
		stale bool
	}{
		{nil, true},
		{[]string{"active: LOC_QP_OP_ERR"}, false},
		{[]string{"active: x", "passive: y"}, false},
	} {
		msg, stale := verdict("reason", r.errs)
		if stale != r.stale || !strings.Contains(msg, "reason") {
			t.Errorf("verdict(%q) = %q, %v", r.errs, msg, stale)
		}
	}
}
