package main

import (
	"context"

	"github.com/urfave/cli/v3"
)

func scratchCommand() *cli.Command {
	return &cli.Command{
		Name:  "scratch",
		Usage: "Run the daemon on the embedded default config in a scratch root",
		Action: func(ctx context.Context, cmd *cli.Command) error {
			return nil
		},
	}
}
