package verbstest

import (
	"bytes"
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
