// Package keeper is the node-wide process keeper of containerd-kuasar.
//
// containerd-kuasar runs no shim per pod, so something must stay the parent
// of workload processes across a restart of the daemon: the keeper. It is one
// small process per node (not per pod) that
//   - spawns processes on the daemon's behalf (runc create/exec, hypervisors)
//     and, being a child subreaper, adopts the container processes those
//     leave behind;
//   - reaps them and keeps each exit, named by pid and start time so that a
//     reused pid is never confused with the process that had it, until the
//     daemon acknowledges it: exits that happen while the daemon is down are
//     not lost;
//   - holds the standard streams of the processes it spawned: the stdin they
//     must not see closed before CloseIO, and their terminals, which it
//     copies to and from containerd's FIFOs, so that a terminal outlives a
//     daemon restart.
//
// The daemon talks to it with ttrpc (the API in package api) over a Unix
// socket only the keeper's own user may use; the daemon's side is Client.
package keeper

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

// ProtocolVersion is bumped on any incompatible change of the API.
const ProtocolVersion = 2

// LostStatus is reported for a process whose exit status is unknown: it
// was not the keeper's child (the keeper that parented it is gone).
const LostStatus = 255

// ProcessRef names one process: its pid and its start time in clock ticks
// since boot (as /proc/PID/stat reports it). A zero start time matches any
// process with that pid.
type ProcessRef struct {
	Pid       int
	StartTime uint64
}

// RefOf names the process that has pid now.
func RefOf(pid int) ProcessRef {
	return ProcessRef{Pid: pid, StartTime: proc.StartTime(pid)}
}

func (r ProcessRef) String() string { return fmt.Sprintf("%d@%d", r.Pid, r.StartTime) }

// Alive reports whether the process still exists (a zombie included).
func (r ProcessRef) Alive() bool { return proc.Alive(r.Pid, r.StartTime) }

func (r ProcessRef) toAPI() *api.ProcessRef {
	return &api.ProcessRef{Pid: int32(r.Pid), StartTime: r.StartTime}
}

func refFromAPI(r *api.ProcessRef) ProcessRef {
	if r == nil {
		return ProcessRef{}
	}
	return ProcessRef{Pid: int(r.GetPid()), StartTime: r.GetStartTime()}
}

// Exit is how a process ended.
type Exit struct {
	Process ProcessRef
	// Status follows containerd's convention: the exit code, or 128+signal
	// when the process was killed by a signal.
	Status   int
	Signaled bool
	At       time.Time
	// Lost is set when the status could not be known (LostStatus).
	Lost bool
}

func (e Exit) toAPI() *api.Exit {
	return &api.Exit{
		Process:  e.Process.toAPI(),
		Status:   int32(e.Status),
		Signaled: e.Signaled,
		ExitedAt: timestamppb.New(e.At),
		Lost:     e.Lost,
	}
}

func exitFromAPI(e *api.Exit) Exit {
	return Exit{
		Process:  refFromAPI(e.GetProcess()),
		Status:   int(e.GetStatus()),
		Signaled: e.GetSignaled(),
		At:       e.GetExitedAt().AsTime(),
		Lost:     e.GetLost(),
	}
}
