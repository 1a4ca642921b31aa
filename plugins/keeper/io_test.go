package keeper

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
)

func TestOpenOutput(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "out")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := openOutput(fifo) // read-write: must not block without a reader
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	file := filepath.Join(dir, "log")
	f, err = openOutput("file://" + file)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("x")
	f.Close()
	if b, _ := os.ReadFile(file); string(b) != "x" {
		t.Fatalf("file:// output %q", b)
	}
	if f, err := openOutput(""); f != nil || err != nil {
		t.Fatal("empty path must mean no output")
	}
	if _, err := openOutput("binary:///usr/bin/logger"); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("binary log URI: %v", err)
	}
}
