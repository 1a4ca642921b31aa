package sentry

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// A container that escapes into the sentry owns the control server the
// daemon calls (Wait, Processes, Event, State...). urpc decodes a reply
// with a json.Decoder straight off the socket, with no bound: a hostile
// sentry that answers with an endless value makes containerd-kuasar, the
// node's containerd, allocate until it is OOM-killed. A reply must be
// bounded (ttrpc bounds its messages to 4 MiB; a process list or stats
// are far smaller), and a larger one fail the call.
func TestHostileSentryReplyIsBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "runsc-hostile.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const replyMiB = 128
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		_, _ = c.Read(buf) // the call
		// One process whose command is replyMiB long.
		_, _ = c.Write([]byte(`{"success":true,"result":[{"pid":1,"cmd":"`))
		chunk := bytes.Repeat([]byte("A"), 1<<20)
		for range replyMiB {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		_, _ = c.Write([]byte(`"}]}`))
	}()

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	procs, err := New(path).Processes(ctx, "c1")
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grew := (after.TotalAlloc - before.TotalAlloc) >> 20
	if err == nil {
		n := 0
		if len(procs) > 0 {
			n = len(procs[0].Cmd)
		}
		t.Errorf("a %d MiB reply of the sentry was taken (a command of %d bytes; the daemon allocated %d MiB for it): a hostile sentry can make the daemon allocate without bound", replyMiB, n, grew)
	} else if grew > 64 {
		t.Errorf("the call failed (%v) but only after the daemon allocated %d MiB", strings.SplitN(err.Error(), "\n", 2)[0], grew)
	}
}
