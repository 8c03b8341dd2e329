"""Recorded episodes (gpu_runtime.rollout_log): the runtime's ingest of a step's episodes, and the read.

POST /api/v1/ingest/jobs/{id}/rollouts  {"step": int, "episodes": [episode, ...]}  (job token)
     1-128 episodes, the body within API_MAX_BODY_BYTES (413 beyond) -> 201 (new step) / 200 (replaced).
GET  /api/v1/jobs/{id}/rollouts?step=N  the episodes of step N (the latest stored step without `step`)
     and the steps stored; 404 when none is stored at N, or for another organization's job.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from api.common import query_filters
from api.serializers import ErrorSerializer, StrictSerializer
from api.tenancy import tenant_of
from api.views.ingest import IngestApi, ingest_body
from portal.models import Scope
from portal.selectors.jobs import job_get, rollout_get, rollout_steps
from portal.services import ingest, rollouts

TEXT = 20_000 + 100  # the runtime cuts texts to `rollouts.max_text_chars` (<= 20,000) plus a short marker


class TokenCountsSerializer(serializers.Serializer):
    prompt = serializers.IntegerField(min_value=0)
    generated = serializers.IntegerField(min_value=0, help_text="Tokens the policy generated (trained).")
    untrained = serializers.IntegerField(min_value=0, help_text="Prompt, observation and tool tokens.")
    total = serializers.IntegerField(min_value=0)


class TurnTokensSerializer(serializers.Serializer):
    generated = serializers.IntegerField(min_value=0)
    observation = serializers.IntegerField(min_value=0)


class RolloutTurnSerializer(serializers.Serializer):
    text = serializers.CharField(max_length=TEXT, allow_blank=True, trim_whitespace=False)
    action = serializers.CharField(max_length=TEXT, allow_blank=True, trim_whitespace=False)
    tool_calls = serializers.ListField(child=serializers.DictField(), max_length=64, default=list)
    reward = serializers.FloatField()
    truncated = serializers.BooleanField()
    observation = serializers.CharField(
        max_length=TEXT, allow_blank=True, trim_whitespace=False, help_text="What the environment answered."
    )
    info = serializers.DictField(default=dict)
    tokens = TurnTokensSerializer()


class RolloutEpisodeSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0)
    group = serializers.IntegerField(help_text="The prompt (seed) group the episode answers.")
    game = serializers.IntegerField(allow_null=True, help_text="Multi-agent: the game; its roles share it.")
    role = serializers.CharField(max_length=100)
    reward = serializers.FloatField()
    final_reward = serializers.FloatField()
    stop_reason = serializers.CharField(max_length=50, allow_blank=True)
    prompt = serializers.CharField(max_length=TEXT, allow_blank=True, trim_whitespace=False)
    turns = RolloutTurnSerializer(many=True, max_length=256)
    tokens = TokenCountsSerializer()


class IngestRolloutsInput(StrictSerializer):
    step = serializers.IntegerField(min_value=0, max_value=ingest.MAX_STEP)
    episodes = RolloutEpisodeSerializer(many=True, min_length=1, max_length=rollouts.MAX_EPISODES)


class IngestRolloutsOutput(serializers.Serializer):
    step = serializers.IntegerField()
    episodes = serializers.IntegerField()
    size_bytes = serializers.IntegerField()


class IngestRolloutsApi(IngestApi):
    @extend_schema(
        operation_id="ingest_rollouts",
        request=IngestRolloutsInput,
        responses={201: IngestRolloutsOutput, 200: IngestRolloutsOutput, 409: ErrorSerializer},
        description="A step's recorded episodes. Idempotent on (job, step): the same step again replaces it.",
    )
    def post(self, request, job_id):
        s = IngestRolloutsInput(data=ingest_body(request))
        s.is_valid(raise_exception=True)
        row, created = rollouts.rollouts_record(job=self.job(request), **s.validated_data)
        body = {"step": row.step, "episodes": len(row.episodes), "size_bytes": row.size_bytes}
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class RolloutsOutputSerializer(serializers.Serializer):
    step = serializers.IntegerField()
    steps = serializers.ListField(child=serializers.IntegerField(), help_text="Every step stored, in order.")
    episodes = RolloutEpisodeSerializer(many=True)


class JobRolloutsApi(APIView):
    read_scope = Scope.JOBS_READ

    class JobRolloutsFilter(StrictSerializer):
        step = serializers.IntegerField(required=False, min_value=0, max_value=ingest.MAX_STEP)

    @extend_schema(
        operation_id="jobs_rollouts",
        parameters=[OpenApiParameter("step", int, description="The step; the latest stored when absent.")],
        responses={200: RolloutsOutputSerializer, 404: ErrorSerializer},
        description="Episodes recorded at a step (best and worst first). Kept: the last "
        f"{rollouts.KEEP_LAST} steps, every {rollouts.KEEP_EVERY}th before them, at most "
        f"{rollouts.MAX_STEPS} steps per job.",
    )
    def get(self, request, job_id):
        job = job_get(tenant_of(request).organization, job_id)
        d = query_filters(request, self.JobRolloutsFilter)
        row = rollout_get(job, d.get("step"))
        return Response({"step": row.step, "steps": rollout_steps(job), "episodes": row.episodes})
