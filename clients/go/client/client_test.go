package client

import (
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "townhall.dev/townhall/clients/go/townhall/v1"
)

func TestRetryAfterReadsRetryInfoBeforeTheTrailer(t *testing.T) {
	shed, err := status.New(codes.ResourceExhausted, "room R is full").WithDetails(
		&errdetails.ErrorInfo{Reason: "ROOM_FULL", Domain: "townhall.dev"},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(1373 * time.Millisecond)},
	)
	if err != nil {
		t.Fatal(err)
	}
	trailer := metadata.Pairs("retry-after-ms", "900")
	if wait, ok := RetryAfter(shed.Err(), trailer); !ok || wait != 1373*time.Millisecond {
		t.Errorf("RetryAfter = %v, %v; want 1.373s from RetryInfo", wait, ok)
	}
	if reason := Reason(shed.Err(), nil); reason != "ROOM_FULL" {
		t.Errorf("Reason = %q; want ROOM_FULL", reason)
	}
}

func TestRetryAfterAndReasonFallBackToTheOldTrailers(t *testing.T) {
	plain := status.Error(codes.Unavailable, "relay is shutting down")
	trailer := metadata.Pairs("retry-after-ms", "250", "townhall-reason", "draining")
	if wait, ok := RetryAfter(plain, trailer); !ok || wait != 250*time.Millisecond {
		t.Errorf("RetryAfter = %v, %v; want 250ms", wait, ok)
	}
	if reason := Reason(plain, trailer); reason != "draining" {
		t.Errorf("Reason = %q; want draining", reason)
	}
	if _, ok := RetryAfter(plain, metadata.Pairs("retry-after-ms", "soon")); ok {
		t.Error("a malformed retry-after-ms was taken as a delay")
	}
	if reason := Reason(plain, nil); reason != "" {
		t.Errorf("Reason = %q; want none", reason)
	}
}

func TestFatalStatuses(t *testing.T) {
	for code, fatal := range map[codes.Code]bool{
		codes.PermissionDenied: true, codes.FailedPrecondition: true, codes.NotFound: true,
		codes.Unavailable: false, codes.ResourceExhausted: false, codes.Canceled: false,
	} {
		if Fatal(status.Error(code, "")) != fatal {
			t.Errorf("Fatal(%v) = %v", code, !fatal)
		}
	}
}

func TestFramesSentAgainAfterASpeakerMovedAreDropped(t *testing.T) {
	heard := heardFrames{}
	frame := func(speaker uint64, sequence uint32) *pb.AudioFrame {
		return &pb.AudioFrame{SpeakerId: speaker, Sequence: sequence, CaptureTsUs: int64(sequence) * 20_000}
	}
	first := &pb.Chunk{Sequence: 1, Frames: []*pb.AudioFrame{frame(1, 1), frame(1, 2), frame(2, 1)}}
	if got := heard.fresh(first); got != first {
		t.Fatal("a chunk of new frames was changed")
	}
	again := &pb.Chunk{Sequence: 1, Epoch: 2, Frames: []*pb.AudioFrame{frame(1, 2), frame(1, 3), frame(2, 1)}}
	got := heard.fresh(again)
	if len(got.GetFrames()) != 1 || got.GetFrames()[0].GetSequence() != 3 || got.GetEpoch() != 2 {
		t.Errorf("fresh kept %v; want speaker 1's frame 3 alone", got.GetFrames())
	}
}
