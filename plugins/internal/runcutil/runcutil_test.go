package runcutil

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestFailure(t *testing.T) {
	base := errors.New("exit status 1")
	for _, tc := range []struct {
		msg  string
		kind error
	}{
		{"container does not exist", errdefs.ErrNotFound},
		{"cannot kill: container not running", errdefs.ErrNotFound},
		{"process already finished", errdefs.ErrNotFound},
		{`runc create failed: unable to start container process: exec: "/no/such": stat /no/such: no such file or directory`, errdefs.ErrFailedPrecondition},
		{`runc exec failed: unable to start container process: exec: "nope": executable file not found in $PATH`, errdefs.ErrFailedPrecondition},
		{"something else broke", nil},
		{"", nil},
	} {
		err := Failure(tc.msg, base)
		if tc.kind != nil && !errors.Is(err, tc.kind) {
			t.Errorf("%q: %v is not %v", tc.msg, err, tc.kind)
		}
		if tc.kind == nil && (errdefs.IsNotFound(err) || errdefs.IsFailedPrecondition(err)) {
			t.Errorf("%q: classified as %v", tc.msg, err)
		}
		if tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%q lost from %v", tc.msg, err)
		}
		if tc.msg == "" && !errors.Is(err, base) {
			t.Errorf("no message: %v, want runc's exit", err)
		}
	}
}

func TestLogError(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log.json")
	os.WriteFile(p, []byte(`{"level":"info","msg":"fine"}
{"level":"error","msg":"first"}
not json
{"level":"error","msg":"exec: \"x\": not found"}
{"level":"debug","msg":"later"}
`), 0o600)
	if got := LogError(p); got != `exec: "x": not found` {
		t.Fatalf("LogError = %q", got)
	}
	if got := LogError(filepath.Join(t.TempDir(), "missing")); got != "" {
		t.Fatalf("missing log: %q", got)
	}
}

func TestParsePs(t *testing.T) {
	if pids, err := ParsePs([]byte("[1,42]\n")); err != nil || len(pids) != 2 || pids[1] != 42 {
		t.Errorf("ParsePs = %v, %v", pids, err)
	}
	if _, err := ParsePs([]byte("container x is not running")); err == nil {
		t.Error("ParsePs of a message")
	}
}
